"""Diffrax's `diffeqsolve` gradient with loopax vs Equinox's loop underneath.

Workload: a neural ODE (state 32, MLP width 64, `tanh`, plus a fixed rotation so the
solution keeps oscillating), Tsit5, `PIDController`,
`RecursiveCheckpointAdjoint(checkpoints=c)`, `SaveAt(t1=True)`, loss = sum of squares
of the final state, gradient with respect to the MLP weights and `y0`. The number of
steps is set by the controller (reported as `steps`).

Both variants are compiled in this process: "equinox" is Diffrax as installed;
"loopax" is the same function traced with `loopax.while_loop` swapped into Diffrax's
loop hooks (`equinox.internal.while_loop`, `diffrax._adjoint._inner_loop` and
`_outer_loop`, as in `docs/clients.md`). They are then timed round by round,
interleaved, and the ratio loopax / equinox of median gradient times is reported.
Target: <= 0.85 at equal checkpoints.

Run: `python benchmarks/clients.py [--quick]`
"""

import argparse
import contextlib
import importlib
import statistics
import time

import diffrax
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import machine, print_table, verdict, write_json

import loopax


STATE, WIDTH = 32, 64
OMEGA = 10.0  # A fixed rotation added to the MLP: keeps the solution oscillating.
TARGET = 0.85


@contextlib.contextmanager
def loopax_underneath():
    """Diffrax (and Optimistix, Lineax) run their loops on `loopax.while_loop`."""
    adjoint = importlib.import_module("diffrax._adjoint")
    saved = (eqxi.while_loop, adjoint._inner_loop, adjoint._outer_loop)
    eqxi.while_loop = loopax.while_loop
    adjoint._inner_loop = jax.named_call(loopax.while_loop, name="inner-loop")
    adjoint._outer_loop = jax.named_call(loopax.while_loop, name="outer-loop")
    jax.clear_caches()  # `diffeqsolve` is jitted: do not reuse Equinox-loop traces.
    try:
        yield
    finally:
        eqxi.while_loop, adjoint._inner_loop, adjoint._outer_loop = saved
        jax.clear_caches()


def make_problem(t1: float, rtol: float):
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(0), 4)
    params = {
        "w1": jr.normal(k1, (WIDTH, STATE)) / STATE**0.5,
        "w2": jr.normal(k2, (STATE, WIDTH)) / WIDTH**0.5,
    }
    y0 = jr.normal(k3, (STATE,))
    a = jr.normal(k4, (STATE, STATE)) / STATE**0.5
    rotation = OMEGA * (a - a.T)

    def vector_field(t, y, p):
        return p["w2"] @ jnp.tanh(p["w1"] @ y) + rotation @ y

    def solve(p, y0, checkpoints):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            t0=0.0,
            t1=t1,
            dt0=0.01,
            y0=y0,
            args=p,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol * 1e-2),
            adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints),
            max_steps=4096,
        )

    def make_grad(checkpoints):
        def loss(p, y0):
            return jnp.sum(solve(p, y0, checkpoints).ys ** 2)

        return jax.grad(loss, argnums=(0, 1))

    num_steps = int(
        jax.jit(lambda p, y: solve(p, y, None).stats["num_steps"])(params, y0)
    )
    return params, y0, make_grad, num_steps


def compile_fn(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def measure(checkpoints: int, params, y0, make_grad, repeats: int, min_time: float):
    grad = make_grad(checkpoints)
    compiled, compile_s = {}, {}
    compiled["equinox"], compile_s["equinox"] = compile_fn(grad, params, y0)
    with loopax_underneath():
        compiled["loopax"], compile_s["loopax"] = compile_fn(grad, params, y0)
    outs = {name: jax.block_until_ready(c(params, y0)) for name, c in compiled.items()}
    max_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree_util.tree_leaves(outs["loopax"]),
            jax.tree_util.tree_leaves(outs["equinox"]),
            strict=True,
        )
    )
    times = {name: [] for name in compiled}
    begin = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - begin < min_time:
        for name, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(params, y0))
            times[name].append(time.perf_counter() - start)
        rounds += 1
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "checkpoints": checkpoints,
        "equinox_s": median["equinox"],
        "loopax_s": median["loopax"],
        "ratio": median["loopax"] / median["equinox"],
        "equinox_compile_s": compile_s["equinox"],
        "loopax_compile_s": compile_s["loopax"],
        "max_abs_grad_diff": max_diff,
        "rounds": rounds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size, fewer rounds")
    args = parser.parse_args()
    if args.quick:
        t1, rtol, grid, repeats, min_time = 2.0, 1e-5, [8], 3, 0.5
    else:
        t1, rtol, grid, repeats, min_time = 10.0, 1e-5, [4, 8, 16, 32], 7, 2.0
    params, y0, make_grad, num_steps = make_problem(t1, rtol)
    print(f"{machine()}; neural ODE state {STATE}, width {WIDTH}, {num_steps} steps")
    rows = []
    for c in grid:
        row = measure(c, params, y0, make_grad, repeats, min_time)
        row["steps"] = num_steps
        row["target"] = verdict(row["ratio"] <= TARGET)
        rows.append(row)
    print_table(
        rows,
        [
            "steps",
            "checkpoints",
            "equinox_s",
            "loopax_s",
            "ratio",
            "target",
            "equinox_compile_s",
            "loopax_compile_s",
            "max_abs_grad_diff",
        ],
    )
    path = write_json("clients", {"quick": args.quick, "target": TARGET, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
