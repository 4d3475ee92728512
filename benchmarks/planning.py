"""How much do the planning helpers cost? (issue 22: a preview must cost far less
than what it previews.)

Times `loopax.schedule(n, c)` (counts only: the actions are not enumerated) and
`loopax.suggest_checkpoints`, each in a fresh cache state, with their peak Python
memory (tracemalloc, in a second run), for n = 10**6, 10**7, 10**9 (and, for the
online rule at larger c, shorter loops: its time grows with the number of stores).

Run: `python benchmarks/planning.py [--json out.json]`.

`--grid` times the online rule's counts the way issue 22 states its targets, one
process per call (fresh caches, nothing shared between calls): `schedule(n, c)` for
n in {10**6, 10**7, 10**9} and c in {2, 8, 16, 64, 256, 512, 1000}, and
`suggest_checkpoints(n, max_recompute_factor=2)`, each with its growth of the peak
resident memory (`resource`) and, when it takes under 2 s, its peak Python
allocation (tracemalloc, in a second run). `--timeout S` gives up on a call after S seconds.
"""

import argparse
import functools as ft
import json
import resource
import subprocess
import sys
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


GRID = [
    *(
        ("schedule", n, c)
        for n in (10**6, 10**7, 10**9)
        for c in (2, 8, 16, 64, 256, 512, 1000)
    ),
    *(("suggest", n, 2.0) for n in (10**6, 10**7, 10**9)),
]


def one(kind, n, arg):
    """Time one call in this (fresh) process: a JSON line on stdout."""
    if kind == "schedule":
        call = lambda: loopax.schedule(n, int(arg)).recompute_factor  # noqa: E731
    else:
        call = ft.partial(loopax.suggest_checkpoints, n, max_recompute_factor=arg)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    value = call()
    elapsed = time.perf_counter() - start
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    peak = None
    if elapsed < 2.0:
        counts._ONLINE.clear()
        tracemalloc.start()
        call()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    print(
        json.dumps(dict(seconds=elapsed, rss_kib=rss_growth, peak=peak, result=value))
    )


def grid(timeout):
    """Each call of `GRID` in its own process."""
    rows = []
    for kind, n, arg in GRID:
        label = f"{kind}(10**{len(str(n)) - 1}, {arg})"
        command = [sys.executable, __file__, "--one", kind, str(n), str(arg)]
        try:
            out = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, check=True
            )
        except subprocess.TimeoutExpired:
            print(f"{label:<28} > {timeout} s", flush=True)
            rows.append(dict(call=label, seconds=None))
            continue
        row = dict(call=label, **json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(
            f"{label:<28} {row['seconds']:9.3f} s  peak RSS +{row['rss_kib']} KiB  "
            f"{_kib(row['peak'])}  result {row['result']:.6g}",
            flush=True,
        )
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--grid", action="store_true")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--one", nargs=3, default=None)
    args = parser.parse_args()
    if args.one:
        kind, n, arg = args.one
        return one(kind, int(n), float(arg))
    if args.grid:
        rows = grid(args.timeout)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
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
