"""Draw the checkpointing schedules shown in "How checkpointing works".

`loopax.schedule(...)` replays the schedule of a checkpointed gradient without running
any loop; `Schedule.plot` draws it with matplotlib and `print(schedule)` summarises it
as text. This script draws the online schedule of `loopax.while_loop` and the offline
(revolve) schedule of `loopax.scan` for the same loop, 18 steps and 3 checkpoints.

Run: `python docs/examples/plot_schedule.py [--out DIR]` writes `schedule-online.png` and
`schedule-offline.png` into `DIR` (default: `docs/figures/`). The same matplotlib
version gives the same files.
"""

import argparse
import pathlib

import matplotlib


matplotlib.use("Agg")  # Files only: no display needed.
import matplotlib.pyplot as plt  # noqa: E402

import loopax  # noqa: E402


NUM_STEPS, CHECKPOINTS = 18, 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Draw checkpointing schedules.")
    default_out = pathlib.Path(__file__).resolve().parent.parent / "figures"
    parser.add_argument("--out", type=pathlib.Path, default=default_out)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    for name, known_length in (("online", False), ("offline", True)):
        plan = loopax.schedule(NUM_STEPS, CHECKPOINTS, known_length=known_length)
        print(plan, end="\n\n")
        figure = plan.plot(args.out / f"schedule-{name}.png")
        plt.close(figure)


if __name__ == "__main__":
    main()
