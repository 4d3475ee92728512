"""How much does a gradient through `kind="checkpointed"` recompute?

Question: over the grid of (checkpoints c, trip count n) in
`../shared/reference/optimal_counts.csv`, how many body evaluations does one
`jax.grad` through `loopax.while_loop(..., kind="checkpointed", checkpoints=c)` cost
(forward sweep n + recomputations + VJPs n), against the offline optimum (initial value
free) and Equinox's checkpointed loop with the same `checkpoints`?

Targets (issue 3): at every grid point <= Equinox and <= 1.15 x optimum; geometric mean
of ours/optimum <= 1.05.

Our counts come from `loopax._schedule.schedule(n, c).total_evaluations`, the eager
replay of the very controllers the compiled loop runs. With `--measure`, a few points
are also measured: the body calls of a compiled `jax.grad` are counted with an ordered
`jax.debug.callback`, showing that the replay is what the compiled loop does.

Run: `python benchmarks/recompute.py [--measure] [--quick]` (`--quick` changes
nothing: it is always quick). Prints a table and writes
`benchmarks/results/recompute.json`.
"""

import argparse
import csv
import math
from pathlib import Path

from _common import print_table, write_json

from loopax._schedule import schedule


REFERENCE = (
    Path(__file__).resolve().parents[1].parent
    / "shared"
    / "reference"
    / "optimal_counts.csv"
)
RATIO_TARGET = 1.15
GEOMEAN_TARGET = 1.05
# (checkpoints, num_steps) measured with `--measure`.
MEASURED_POINTS = [(1, 20), (2, 50), (3, 100), (8, 200)]


def read_reference() -> list[tuple[int, int, int, int]]:
    with REFERENCE.open() as f:
        return [
            (
                int(row["checkpoints"]),
                int(row["num_steps"]),
                int(row["optimal_total_evaluations"]),
                int(row["equinox_total_evaluations"]),
            )
            for row in csv.DictReader(f)
        ]


def measure(checkpoints: int, num_steps: int) -> int:
    """Body calls of a compiled `jax.grad` through the checkpointed loop."""
    import jax
    import jax.numpy as jnp

    import loopax

    calls = []

    def body_fun(carry):
        i, x = carry
        jax.debug.callback(lambda _: calls.append(None), i, ordered=True)
        return i + 1, jnp.sin(x) * 1.1

    def loss(x):
        _, x = loopax.while_loop(
            lambda c: c[0] < num_steps,
            body_fun,
            (jnp.array(0, jnp.int32), x),
            kind="checkpointed",
            checkpoints=checkpoints,
        )
        return x

    jax.block_until_ready(jax.jit(jax.grad(loss))(jnp.float32(0.3)))
    jax.effects_barrier()
    return len(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also count body calls of a compiled jax.grad at a few points",
    )
    parser.add_argument(
        "--quick", action="store_true", help="accepted for uniformity (always quick)"
    )
    args = parser.parse_args()

    rows = []
    for checkpoints, num_steps, optimal, equinox in read_reference():
        plan = schedule(num_steps, checkpoints)
        ours = plan.total_evaluations
        rows.append(
            {
                "c": checkpoints,
                "n": num_steps,
                "ours": ours,
                "recomputed": plan.num_recomputed,
                "optimal": optimal,
                "equinox": equinox,
                "ours/opt": ours / optimal,
                "ours/eqx": ours / equinox,
            }
        )
    print(f"Total body evaluations per gradient (reference: {REFERENCE})")
    print_table(rows, ["c", "n", "ours", "optimal", "equinox", "ours/opt", "ours/eqx"])

    ratios_opt = [r["ours/opt"] for r in rows]
    ratios_eqx = [r["ours/eqx"] for r in rows]
    summary = {
        "points": len(rows),
        "max_ours_over_optimal": max(ratios_opt),
        "geomean_ours_over_optimal": math.exp(
            sum(map(math.log, ratios_opt)) / len(rows)
        ),
        "max_ours_over_equinox": max(ratios_eqx),
        "points_le_equinox": sum(r["ours"] <= r["equinox"] for r in rows),
        "points_le_1.15_optimal": sum(
            r["ours"] <= RATIO_TARGET * r["optimal"] for r in rows
        ),
        "points_exactly_optimal": sum(r["ours"] == r["optimal"] for r in rows),
    }
    print()
    for key, value in summary.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")

    missed = []
    for r in rows:
        if r["ours"] > r["equinox"]:
            missed.append(
                f"TARGET MISSED: <= equinox at c={r['c']}, n={r['n']}: "
                f"ours {r['ours']} > equinox {r['equinox']}"
            )
        if r["ours"] > RATIO_TARGET * r["optimal"]:
            missed.append(
                f"TARGET MISSED: <= {RATIO_TARGET} x optimal at c={r['c']}, "
                f"n={r['n']}: ours/opt = {r['ours/opt']:.4f}"
            )
    if summary["geomean_ours_over_optimal"] > GEOMEAN_TARGET:
        missed.append(
            f"TARGET MISSED: geometric mean of ours/opt "
            f"{summary['geomean_ours_over_optimal']:.4f} > {GEOMEAN_TARGET}"
        )
    print()
    print("\n".join(missed) if missed else "All recomputation targets met.")

    measured = []
    if args.measure:
        print()
        print("Measured body calls in a compiled jax.grad (ordered debug callback):")
        for checkpoints, num_steps in MEASURED_POINTS:
            replay = schedule(num_steps, checkpoints).total_evaluations
            calls = measure(checkpoints, num_steps)
            measured.append(
                {
                    "c": checkpoints,
                    "n": num_steps,
                    "replay": replay,
                    "measured": calls,
                    "equal": calls == replay,
                }
            )
        print_table(measured, ["c", "n", "replay", "measured", "equal"])
        if not all(m["equal"] for m in measured):
            print("MISMATCH: the replay differs from the compiled loop.")

    path = write_json(
        "recompute",
        {"rows": rows, "summary": summary, "missed": missed, "measured": measured},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
