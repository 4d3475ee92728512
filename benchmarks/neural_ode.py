"""Workload 1 of issue 6: an RK4 neural ODE through each way of writing the loop.

Question: for an RK4 neural ODE (state 64, MLP width 128, fixed step, stopping on
`t >= t1`, so the trip count is only known at run time) of N steps, N in
{100, 1000, 10000} (`--quick`: {100, 1000}), what do forward, gradient, compilation,
XLA temp memory and recomputation cost with

- `loopax.while_loop(kind="checkpointed")` at checkpoints in {default (`max_steps=N`,
  `checkpoints=None`, i.e. ceil(log2(N + 1))), 8, 32, N (store-all, `max_steps=N`)},
- `equinox.internal.while_loop(kind="checkpointed")` at the same checkpoints (and
  `max_steps`: N for default and store-all, 4 N otherwise, as in `against_equinox.py`),
- `lax.scan` storing every step's residuals, `lax.scan` with `jax.checkpoint` per
  step (store every carry), and `lax.while_loop` (forward only)?

All variants of one N are compiled, then timed round by round in this process (so
load changes on a shared machine hit them alike); ratios are what to read. The
verdicts use the median wall-clock time; the ratios of process CPU time (`cpu`) and
of the fastest runs (`min`) are printed beside them, since on a loaded machine the
wall clock alone can be off by a factor of 2 or more.

Body evaluations per gradient (a step's VJP counts as one, as revolve counts): loopax
from `loopax.schedule(N, c, max_steps=...)` (the replay of the compiled controllers);
Equinox counted with an ordered `jax.debug.callback` in the body of a compiled
`jax.grad` of a scalar loop with the same N, checkpoints and max_steps; `lax.scan` 2N.

Targets (issue 6): forward <= 1.02 x `lax.while_loop`; grad <= 0.8 x Equinox at
N=1000, c=8; store-all grad <= 1.15 x `lax.scan`; temp memory <= Equinox's at the same
checkpoints.

Run: `python benchmarks/neural_ode.py [--quick] [--sizes 100 1000] [--no-count]`.
Prints a table and writes `benchmarks/results/neural_ode.json`.
"""

import argparse

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
from _common import (
    machine,
    measure_interleaved,
    print_table,
    verdict,
    write_json,
)
from against_equinox import STATE, WIDTH, make_problem

import loopax
from loopax._schedule import default_checkpoints


FORWARD_TARGET = 1.02
GRAD_VS_EQUINOX_TARGET = 0.8
STORE_ALL_TARGET = 1.15


def checkpoint_cases(num_steps: int, labels) -> list[tuple]:
    """(label, checkpoints, loopax `checkpoints=`, loopax `max_steps=`, equinox
    `max_steps=`) for each label."""
    cases = []
    for label in labels:
        if label == "default":
            c = default_checkpoints(num_steps)
            cases.append((f"default (c={c})", c, None, num_steps, num_steps))
        elif label == "all":
            n = num_steps
            cases.append((f"store-all (c={n})", n, n, n, n))
        elif int(label) < num_steps:
            c = int(label)
            cases.append((f"c={c}", c, c, None, 4 * num_steps))
    return cases


def loopax_loop(checkpoints, max_steps):
    return lambda c, b, x: loopax.while_loop(
        c, b, x, checkpoints=checkpoints, max_steps=max_steps
    )


def equinox_loop(checkpoints, max_steps):
    return lambda c, b, x: eqxi.while_loop(
        c, b, x, kind="checkpointed", checkpoints=checkpoints, max_steps=max_steps
    )


def equinox_evaluations(num_steps: int, checkpoints: int, max_steps: int) -> int:
    """Body calls of a compiled `jax.grad` through Equinox's checkpointed loop."""
    calls = []

    def body_fun(carry):
        i, x = carry
        jax.debug.callback(lambda _: calls.append(None), i, ordered=True)
        return i + 1, jnp.sin(x) * 1.1

    def loss(x):
        return eqxi.while_loop(
            lambda c: c[0] < num_steps,
            body_fun,
            (jnp.array(0, jnp.int32), x),
            kind="checkpointed",
            checkpoints=checkpoints,
            max_steps=max_steps,
        )[1]

    jax.block_until_ready(jax.jit(jax.grad(loss))(jnp.float32(0.3)))
    jax.effects_barrier()
    return len(calls)


def run(
    num_steps: int,
    labels=("default", 8, 32, "all"),
    *,
    repeats: int = 5,
    min_time: float = 1.0,
    count: bool = True,
    forward: bool = True,
    scan_checkpointed: bool = True,
) -> dict:
    """Measure one N. Returns {"rows": [...], "checks": [...]} (JSON-ready)."""
    params, y0, make_loss, scan_loss = make_problem(num_steps)
    grad = lambda loss: jax.grad(loss, argnums=(0, 1))
    cases = checkpoint_cases(num_steps, labels)
    rows, checks = [], []

    def add_rows(results, group, extra):
        for name, result in results.items():
            rows.append(
                {"N": num_steps, "group": group, "variant": name}
                | result
                | extra.get(name, {})
            )

    def row(group, variant):
        return next(
            r
            for r in rows
            if (r["N"], r["group"], r["variant"]) == (num_steps, group, variant)
        )

    if forward:
        fns = {
            "lax.while_loop": make_loss(lax.while_loop),
            "loopax (max_steps=N)": make_loss(loopax_loop(None, num_steps)),
            "loopax (no max_steps)": make_loss(loopax_loop(8, None)),
            "equinox c=8": make_loss(equinox_loop(8, 4 * num_steps)),
            "lax.scan": scan_loss,
        }
        results = measure_interleaved(
            fns, params, y0, repeats=repeats, min_time=min_time
        )
        add_rows(results, "forward", {})
        reference = results["lax.while_loop"]["run_s"]
        for name in ("loopax (max_steps=N)", "loopax (no max_steps)"):
            ratio = results[name]["run_s"] / reference
            checks.append(
                {
                    "N": num_steps,
                    "target": f"forward {name} / lax.while_loop <= {FORWARD_TARGET}",
                    "value": ratio,
                    "cpu_value": results[name]["run_cpu_s"]
                    / results["lax.while_loop"]["run_cpu_s"],
                    "min_value": results[name]["run_min_s"]
                    / results["lax.while_loop"]["run_min_s"],
                    "limit": FORWARD_TARGET,
                    "status": verdict(ratio <= FORWARD_TARGET),
                }
            )

    fns, extra = {}, {}
    for label, c, lx_c, lx_max, eqx_max in cases:
        fns[f"loopax {label}"] = grad(make_loss(loopax_loop(lx_c, lx_max)))
        fns[f"equinox {label}"] = grad(make_loss(equinox_loop(c, eqx_max)))
        extra[f"loopax {label}"] = {
            "checkpoints": c,
            "evaluations": loopax.schedule(
                num_steps, c, max_steps=lx_max
            ).total_evaluations,
        }
        extra[f"equinox {label}"] = {
            "checkpoints": c,
            "evaluations": equinox_evaluations(num_steps, c, eqx_max)
            if count
            else None,
        }
    fns["lax.scan (store all)"] = grad(scan_loss)
    extra["lax.scan (store all)"] = {"evaluations": 2 * num_steps}
    if scan_checkpointed:
        fns["lax.scan + checkpoint/step"] = grad(
            lambda p, y: scan_loss(p, y, checkpoint_each_step=True)
        )
        extra["lax.scan + checkpoint/step"] = {"evaluations": 2 * num_steps}
    results = measure_interleaved(fns, params, y0, repeats=repeats, min_time=min_time)
    add_rows(results, "grad", extra)
    scan = row("grad", "lax.scan (store all)")
    for r in rows:
        if r["group"] == "grad":
            r["time/lax.scan"] = r["run_s"] / scan["run_s"]

    for label, c, *_ in cases:
        ours, theirs = row("grad", f"loopax {label}"), row("grad", f"equinox {label}")
        ratio = ours["run_s"] / theirs["run_s"]
        ours["time/equinox"] = ratio
        ours["temp/equinox"] = ours["temp_bytes"] / max(theirs["temp_bytes"], 1)
        target = num_steps == 1000 and c == 8
        checks.append(
            {
                "N": num_steps,
                "target": f"grad loopax / equinox, {label}"
                + (f" <= {GRAD_VS_EQUINOX_TARGET}" if target else " (no target)"),
                "value": ratio,
                "cpu_value": ours["run_cpu_s"] / theirs["run_cpu_s"],
                "min_value": ours["run_min_s"] / theirs["run_min_s"],
                "limit": GRAD_VS_EQUINOX_TARGET if target else None,
                "status": verdict(ratio <= GRAD_VS_EQUINOX_TARGET if target else None),
            }
        )
        checks.append(
            {
                "N": num_steps,
                "target": f"grad temp bytes loopax / equinox, {label} <= 1",
                "value": ours["temp/equinox"],
                "limit": 1.0,
                "status": verdict(ours["temp_bytes"] <= theirs["temp_bytes"]),
            }
        )
        if label.startswith("store-all"):
            ratio = ours["time/lax.scan"]
            checks.append(
                {
                    "N": num_steps,
                    "target": f"grad loopax store-all / lax.scan <= {STORE_ALL_TARGET}",
                    "value": ratio,
                    "cpu_value": ours["run_cpu_s"] / scan["run_cpu_s"],
                    "min_value": ours["run_min_s"] / scan["run_min_s"],
                    "limit": STORE_ALL_TARGET,
                    "status": verdict(ratio <= STORE_ALL_TARGET),
                }
            )
    return {"rows": rows, "checks": checks}


def print_results(rows: list[dict], checks: list[dict]) -> None:
    shown = []
    for r in rows:
        shown.append(
            r
            | {
                "run_ms": r["run_s"] * 1e3,
                "temp_KiB": None if r["temp_bytes"] is None else r["temp_bytes"] / 1024,
            }
        )
    print_table(
        shown,
        [
            "N",
            "group",
            "variant",
            "compile_s",
            "run_ms",
            "temp_KiB",
            "evaluations",
            "time/lax.scan",
            "time/equinox",
            "temp/equinox",
        ],
    )
    print()
    print_table(checks, ["N", "target", "value", "cpu_value", "min_value", "status"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {100, 1000}")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument(
        "--no-count", action="store_true", help="skip counting Equinox's evaluations"
    )
    args = parser.parse_args()
    sizes = args.sizes or ([100, 1000] if args.quick else [100, 1000, 10000])
    print(
        f"# neural_ode: RK4 neural ODE, state {STATE}, width {WIDTH}; {machine()}",
        flush=True,
    )
    rows, checks = [], []
    for n in sizes:
        out = run(n, repeats=5 if args.quick else 9, count=not args.no_count)
        rows += out["rows"]
        checks += out["checks"]
        print(f"# N={n} done", flush=True)
    print_results(rows, checks)
    path = write_json(
        "neural_ode",
        {"quick": args.quick, "sizes": sizes, "rows": rows, "checks": checks},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
