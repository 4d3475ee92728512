"""Compile time of gradients through checkpointed loops: loopax against Equinox.

Users of checkpointed loops wait for compiles more than for runs (Diffrax issue 94;
jaxley issue 55). This script splits the time to a runnable gradient into its three
stages, each measured with JAX's caches cleared, alternating loopax and Equinox,
medians of `--rounds` rounds:

- **trace**: Python tracing to a jaxpr, including every custom rule (jvp, partial
  evaluation, transpose) — `jax.jit(f).trace(*args)`;
- **lower**: jaxpr to StableHLO — `.lower()`;
- **compile**: XLA's optimisation and code generation — `.compile()`.

It also reports the optimized HLO's size (instructions) and how many copies of the
loop body it holds (counted by the body's distinctive `tanh`: one per RK4 stage, so
copies = tanh count / 4).

Workload: the RK4 neural ODE (state 64, MLP width 128, N = 1000 steps) of
`against_equinox.py`, first order (gradient) at c = 8, 32, 128 and store-all, and
second order (gradient of the gradient's norm) at c = 8.

Run: `python benchmarks/compile_time.py [--quick] [--rounds R]`.
"""

import argparse
import statistics
import time

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import machine, mlp_params, print_table, rk4_step, write_json

import loopax


STATE, WIDTH, NUM_STEPS = 64, 128, 1000


def make_loss(while_loop, **loop_kwargs):
    dt = 1.0 / NUM_STEPS
    t1 = 1.0 - 0.5 * dt

    def loss(p, y0):
        def body(carry):
            t, y = carry
            return t + dt, rk4_step(p, y, dt)

        _, y = while_loop(
            lambda c: c[0] < t1, body, (jnp.array(0.0), y0), **loop_kwargs
        )
        return jnp.sum(y**2)

    return loss


def loss_for(library: str, checkpoints):
    if library == "loopax":
        return make_loss(loopax.while_loop, checkpoints=checkpoints)
    return make_loss(
        eqxi.while_loop,
        kind="checkpointed",
        checkpoints=checkpoints,
        max_steps=NUM_STEPS,
    )


def first_order(loss):
    return jax.grad(loss, argnums=(0, 1))


def second_order(loss):
    def grad_norm(p, y):
        g = jax.grad(loss, argnums=1)(p, y)
        return jnp.sum(g**2)

    return jax.grad(grad_norm, argnums=0)


def stages(fn, args) -> dict:
    """Seconds per stage with cold caches, and the optimized HLO's size."""
    jax.clear_caches()
    start = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text() or ""
    instructions = sum(1 for line in hlo.splitlines() if " = " in line)
    return dict(
        trace_s=trace_s,
        lower_s=lower_s,
        compile_s=compile_s,
        total_s=trace_s + lower_s + compile_s,
        hlo_instructions=instructions,
        body_copies=hlo.count(" tanh(") / 4,
    )


def main(quick: bool, rounds: int):
    params = mlp_params(jr.PRNGKey(0), STATE, WIDTH)
    y0 = jr.normal(jr.PRNGKey(1), (STATE,))
    args = (params, y0)
    cases = [("grad", c, first_order) for c in (8, 32, 128, NUM_STEPS)]
    cases.append(("grad of grad", 8, second_order))
    if quick:
        cases = [cases[0], cases[-1]]
    rows = []
    for order, c, transform in cases:
        # Equinox's checkpointed loop is a `custom_vjp`: no second order.
        libraries = ["loopax"] if transform is second_order else ["loopax", "equinox"]
        samples = {library: [] for library in libraries}
        for _ in range(rounds):
            for library in libraries:  # alternate, so drift hits both alike
                samples[library].append(stages(transform(loss_for(library, c)), args))
        medians = {
            lib: {k: statistics.median(s[k] for s in ss) for k in ss[0]}
            for lib, ss in samples.items()
        }
        for library, m in medians.items():
            reference = medians.get("equinox")
            rows.append(
                dict(
                    order=order,
                    checkpoints="all" if c == NUM_STEPS else c,
                    library=library,
                    **{k: round(v, 3) for k, v in m.items()},
                    vs_equinox=None
                    if reference is None
                    else round(m["total_s"] / reference["total_s"], 2),
                )
            )
    print(f"# compile time, {machine()}, N = {NUM_STEPS}, medians of {rounds}")
    print_table(
        rows,
        [
            "order",
            "checkpoints",
            "library",
            "trace_s",
            "lower_s",
            "compile_s",
            "total_s",
            "vs_equinox",
            "hlo_instructions",
            "body_copies",
        ],
    )
    write_json("compile_time", dict(rows=rows, rounds=rounds))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.quick, args.rounds)
