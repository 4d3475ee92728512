"""How long, and in how much memory, does a gradient through 1,000,000 steps run?

A checkpointed `loopax.while_loop` of 10**6 steps of `x <- x + 1e-6 sin(x)` (Euler
steps of `dx/dt = sin(x)` over [0, 1], so the gradient stays of order 1; the body is
elementwise, so forward mode gives an independent reference for the gradient) with
`checkpoints=10`, on a small carry, in float64 (`jax_enable_x64`): in float32 the
rounding of a million products of `1 + 1e-6 cos(x)` differs by ~1% between two
evaluation orders, so only float64 makes the comparison with the reference tight. Reports compile time, one gradient's run time
(a single run: it takes seconds), XLA's temp memory against the (c + 3) x carry bound,
the schedule's body evaluations, and the largest relative difference from the
forward-mode reference. `tests/test_stress.py` checks the same loop (`-m slow`).

Usage: python benchmarks/stress.py [--steps N] [--checkpoints C] [--size D]
"""

import argparse
import time

import jax
import jax.lax as lax
import jax.numpy as jnp
from _common import machine, print_table, write_json

import loopax


def _body(c):
    i, x = c
    return i + 1, x + 1e-6 * jnp.sin(x)


def run(num_steps: int, checkpoints: int, size: int) -> dict:
    def loss(x):
        _, x = loopax.while_loop(
            lambda c: c[0] < num_steps,
            _body,
            (jnp.array(0), x),
            kind="checkpointed",
            checkpoints=checkpoints,
        )
        return jnp.sum(x)

    x = jnp.linspace(0.0, 1.0, size, dtype=jnp.float64)
    start = time.perf_counter()
    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    start = time.perf_counter()
    got = jax.block_until_ready(compiled(x))
    run_s = time.perf_counter() - start

    def forward(x):
        return lax.fori_loop(0, num_steps, lambda _, x: _body((0, x))[1], x)

    start = time.perf_counter()
    _, want = jax.block_until_ready(
        jax.jit(lambda x: jax.jvp(forward, (x,), (jnp.ones_like(x),)))(x)
    )
    reference_s = time.perf_counter() - start
    carry = x.nbytes + 8 + 4  # x, the user's int64 counter, loopax's int32 step counter
    plan = loopax.schedule(num_steps=num_steps, checkpoints=checkpoints)
    return {
        "steps": num_steps,
        "checkpoints": checkpoints,
        "carry_bytes": carry,
        "compile_s": compile_s,
        "grad_s": run_s,
        "jvp_reference_s": reference_s,
        "temp_bytes": temp,
        "bound_bytes": (checkpoints + 3) * carry,
        "body_evaluations": plan.total_evaluations,
        "recompute_factor": plan.recompute_factor,
        "max_rel_error": float(jnp.max(jnp.abs(got - want) / jnp.abs(want))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    with jax.enable_x64(True):
        row = run(args.steps, args.checkpoints, args.size)
    print(machine())
    print_table([row], list(row))
    print(f"wrote {write_json('stress', row)}")


if __name__ == "__main__":
    main()
