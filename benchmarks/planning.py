"""How much do the planning helpers cost? (issue 22: a preview must cost far less
than what it previews.)

Times `loopax.schedule(n, c)` (counts only: the actions are not enumerated) and
`loopax.suggest_checkpoints`, each in a fresh cache state, with their peak Python
memory (tracemalloc, in a second run), for n = 10**6, 10**7, 10**9 (and, for the
online rule at larger c, shorter loops: its time grows with the number of stores).

Run: `python benchmarks/planning.py [--json out.json]`.
"""

import argparse
import json
import time
import tracemalloc

import loopax
from loopax._schedule import counts


def measure(fn):
    """`(value, seconds, peak bytes)`: timed without tracemalloc (which slows Python
    code down ~20x), then run again under tracemalloc for the memory if that takes
    under a second (else the peak is None)."""
    counts._ONLINE.clear()
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    peak = None
    if elapsed < 1.0:
        counts._ONLINE.clear()
        tracemalloc.start()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return value, elapsed, peak


def _kib(peak):
    return "       -    " if peak is None else f"{peak / 1024:8.1f} KiB"


CASES = [
    # (label, n, function)
    *(
        (f"schedule(n, {c}, known_length=True)", n, c, True)
        for n in (10**6, 10**7, 10**9)
        for c in (1, 8, 100, 1000)
    ),
    *(
        (f"schedule(n, {c})", n, c, False)
        for n, cs in (
            (10**4, (1000,)),
            (10**5, (8, 64)),
            (10**6, (1, 2, 3, 8)),
            (10**7, (1, 2)),
            (10**9, (1, 2)),
        )
        for c in cs
    ),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for label, n, c, known in CASES:
        plan, elapsed, peak = measure(
            lambda n=n, c=c, known=known: loopax.schedule(n, c, known_length=known)
        )
        rows.append(
            dict(
                helper=label,
                n=n,
                seconds=elapsed,
                peak_bytes=peak,
                recompute_factor=plan.recompute_factor,
            )
        )
        print(
            f"{label:<40} n={n:<11} {elapsed * 1e3:9.1f} ms  {_kib(peak)}  "
            f"factor {plan.recompute_factor:.4g}",
            flush=True,
        )
    for n in (10**6, 10**7, 10**9):
        for target in (1.5, 2.0, 3.0):
            c, elapsed, peak = measure(
                lambda n=n, t=target: loopax.suggest_checkpoints(
                    n, max_recompute_factor=t, known_length=True
                )
            )
            label = f"suggest(n, {target}, known_length=True)"
            rows.append(dict(helper=label, n=n, seconds=elapsed, peak_bytes=peak, c=c))
            print(
                f"{label:<40} n={n:<11} {elapsed * 1e3:9.1f} ms  {_kib(peak)}  c={c}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
