"""How does `kind="bounded"` compare with Equinox's bounded loop?

Question: with the same `base`, is loopax's bounded loop at least as fast to compile
and to differentiate as `equinox.internal.while_loop(..., kind="bounded")`, without
Equinox's jump in cost when `max_steps` passes a power of `base`, and does an early
exit make a long bound (`max_steps=4096`, 10 real steps) cost about what a short one
does (`max_steps=16`)?

Structure: Equinox nests `ceil(log_base(max_steps))` scans of length `base` (4097
steps at base 16: four levels, 65536 slots). loopax nests `depth` scans of one common
`length` (`loopax._backends.bounded.plan`; 4097: three levels of 17) and stops at
exactly `max_steps` body calls; both columns are printed.

Body: a 32-dimensional state, one tanh MLP step `x <- tanh(W x + b) + 0.1 x`.
Measured per case and per implementation, in one process, the two implementations
interleaved round by round: compile time (lower + compile of a freshly made jitted
function, median of repeats), run time (median of repeats, `block_until_ready`,
compiled beforehand), both as wall time and as this process's CPU time (steadier on
a loaded machine), and XLA's temporary memory
(`memory_analysis().temp_size_in_bytes`), for the forward loop and for `jax.grad`
with respect to the weights and the initial state.

Run: `python benchmarks/bounded.py [--quick]`. Prints a table and writes
`benchmarks/results/bounded.json`.
"""

import argparse
import functools as ft
import json
import math
import pathlib
import platform
import statistics
import time

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr

import loopax
from loopax._schedule import bounded_plan as plan


DIM = 32
BASE = 16
# (max_steps, real number of steps)
CASES = [(100, 100), (1000, 1000), (4096, 4096), (4097, 4097), (4096, 10), (16, 10)]


def make_loss(impl: str, max_steps: int, num_steps: int):
    def loss(params, x0):
        weight, bias = params

        def cond_fun(carry):
            i, _ = carry
            return i < num_steps

        def body_fun(carry):
            i, x = carry
            return i + 1, jnp.tanh(weight @ x + bias) + 0.1 * x

        init = (jnp.array(0), x0)
        if impl == "equinox":
            _, x = eqxi.while_loop(
                cond_fun, body_fun, init, kind="bounded", max_steps=max_steps, base=BASE
            )
        elif impl == "loopax":
            _, x = loopax.while_loop(
                cond_fun, body_fun, init, kind="bounded", max_steps=max_steps, base=BASE
            )
        else:
            raise ValueError(impl)
        return jnp.sum(x**2)

    return loss


def make_fn(impl: str, max_steps: int, num_steps: int, mode: str):
    loss = make_loss(impl, max_steps, num_steps)
    return loss if mode == "forward" else jax.grad(loss, (0, 1))


def measure(make_fns: dict, args, *, repeats: int, compile_repeats: int) -> dict:
    """Time the function each of `make_fns` makes, on `args`, interleaving the
    implementations round by round so that a change in machine load affects them
    alike. Each compile is of a freshly made function, so no cache is hit."""
    fns = make_fns
    compile_wall = {name: [] for name in fns}
    compile_cpu = {name: [] for name in fns}
    compiled = {}
    for _ in range(compile_repeats):
        for name, make_fn in make_fns.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            compiled[name] = jax.jit(make_fn()).lower(*args).compile()
            compile_wall[name].append(time.perf_counter() - start_wall)
            compile_cpu[name].append(time.process_time() - start_cpu)
    for name in fns:
        jax.block_until_ready(compiled[name](*args))  # warm up
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name in fns:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled[name](*args))
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    out = {}
    for name in fns:
        memory = compiled[name].memory_analysis()
        out[name] = {
            "compile_s": statistics.median(compile_wall[name]),
            "compile_cpu_s": statistics.median(compile_cpu[name]),
            "run_s": statistics.median(wall[name]),
            "run_cpu_s": statistics.median(cpu[name]),
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats, compile_repeats = (11, 1) if args.quick else (101, 5)

    key_w, key_b, key_x = jr.split(jr.PRNGKey(0), 3)
    params = (
        jr.normal(key_w, (DIM, DIM)) / jnp.sqrt(DIM),
        0.1 * jr.normal(key_b, (DIM,)),
    )
    x0 = jr.normal(key_x, (DIM,))

    results = []
    for max_steps, num_steps in CASES:
        for mode in ("forward", "grad"):
            length, depth = plan(max_steps, BASE)
            row = {
                "max_steps": max_steps,
                "num_steps": num_steps,
                "mode": mode,
                "loopax_scans": [length] * depth,
                "equinox_scans": [BASE] * max(1, math.ceil(math.log(max_steps, BASE))),
            }
            fns = {
                impl: ft.partial(make_fn, impl, max_steps, num_steps, mode)
                for impl in ("equinox", "loopax")
            }
            row.update(
                measure(
                    fns, (params, x0), repeats=repeats, compile_repeats=compile_repeats
                )
            )
            for quantity in (
                "compile_s",
                "compile_cpu_s",
                "run_s",
                "run_cpu_s",
                "temp_bytes",
            ):
                ours, theirs = row["loopax"][quantity], row["equinox"][quantity]
                row[f"ratio_{quantity}"] = ours / theirs if theirs else None
            results.append(row)

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, base={BASE}")
    print("time: wall (CPU time of this process); ratio = loopax / equinox")
    print("scan lengths, outermost first:")
    for max_steps in dict.fromkeys(m for m, _ in CASES):
        (row, *_) = [r for r in results if r["max_steps"] == max_steps]
        print(
            f"  max_steps={max_steps}: loopax {row['loopax_scans']}, "
            f"equinox {row['equinox_scans']}"
        )
    header = (
        f"{'max_steps':>9} {'steps':>5} {'mode':>7} | {'run equinox':>19} "
        f"{'run loopax':>19} {'ratio':>11} | {'compile equinox':>15} "
        f"{'compile loopax':>15} {'ratio':>11} | {'temp eqx':>8} {'loopax':>8} "
        f"{'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        e, o = r["equinox"], r["loopax"]
        print(
            f"{r['max_steps']:>9} {r['num_steps']:>5} {r['mode']:>7} | "
            f"{e['run_s'] * 1e3:>7.3f} ({e['run_cpu_s'] * 1e3:>7.3f})ms "
            f"{o['run_s'] * 1e3:>7.3f} ({o['run_cpu_s'] * 1e3:>7.3f})ms "
            f"{r['ratio_run_s']:>4.2f} ({r['ratio_run_cpu_s']:>4.2f}) | "
            f"{e['compile_s']:>5.2f} ({e['compile_cpu_s']:>5.2f})s "
            f"{o['compile_s']:>5.2f} ({o['compile_cpu_s']:>5.2f})s "
            f"{r['ratio_compile_s']:>4.2f} ({r['ratio_compile_cpu_s']:>4.2f}) | "
            f"{e['temp_bytes']:>8} {o['temp_bytes']:>8} {r['ratio_temp_bytes']:>5.2f}"
        )

    def find(max_steps, num_steps, mode):
        (row,) = [
            r
            for r in results
            if (r["max_steps"], r["num_steps"], r["mode"])
            == (max_steps, num_steps, mode)
        ]
        return row

    summary = {}
    for impl in ("equinox", "loopax"):
        for mode in ("forward", "grad"):
            for quantity in ("run_s", "run_cpu_s", "compile_s", "compile_cpu_s"):

                def ratio(a, b, mode=mode, impl=impl, quantity=quantity):
                    return (
                        find(*a, mode)[impl][quantity] / find(*b, mode)[impl][quantity]
                    )

                prefix = f"{impl}_{mode}_{quantity}"
                summary[f"{prefix}_4097_over_4096"] = ratio((4097, 4097), (4096, 4096))
                summary[f"{prefix}_early_exit_4096_over_16"] = ratio(
                    (4096, 10), (16, 10)
                )
    print()
    for name, value in summary.items():
        print(f"{name}: {value:.2f}")

    out = pathlib.Path(__file__).parent / "results" / "bounded.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "base": BASE,
        "dim": DIM,
        "repeats": repeats,
        "compile_repeats": compile_repeats,
    }
    out.write_text(
        json.dumps({"meta": meta, "results": results, "summary": summary}, indent=2)
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
