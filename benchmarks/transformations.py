"""Every transformation through the checkpointed kind: what each costs.

Workload: the RK4 neural ODE of `against_equinox.py` (state 64, MLP width 128,
N = 1000 steps, stopping on `t >= t1`).

Questions answered (ratios measured side by side in this process):
- pure forward mode: `jax.jvp` through `kind="checkpointed"` vs through `kind="lax"`
  (target <= 1.3: forward mode must not pay for checkpointing);
- `jax.linearize` + one tangent evaluation vs `jax.jvp` (informational);
- a Hessian-vector product (forward over reverse) and a gradient of a gradient norm
  (reverse over reverse) vs the first-order gradient, at checkpoints = 8
  (informational: second order costs a small multiple of first order, in memory
  bounded by the checkpoints, not by N);
- XLA temp memory of each compiled program.

Run: `python benchmarks/transformations.py [--quick]`.
"""

import argparse

import jax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    machine,
    measure_interleaved,
    mlp_params,
    print_table,
    rk4_step,
    verdict,
    write_json,
)

import loopax


STATE, WIDTH = 64, 128


def make_loss(num_steps: int, **loop_kwargs):
    dt = 1.0 / num_steps
    t1 = 1.0 - 0.5 * dt  # Stop on t >= t1: exactly num_steps steps.

    def final_state(p, y0):
        def body(carry):
            t, y = carry
            return t + dt, rk4_step(p, y, dt)

        return loopax.while_loop(
            lambda c: c[0] < t1, body, (jnp.array(0.0), y0), **loop_kwargs
        )[1]

    return final_state


def main(quick: bool):
    num_steps = 1000
    params = mlp_params(jr.PRNGKey(0), STATE, WIDTH)
    y0 = jr.normal(jr.PRNGKey(1), (STATE,))
    dy = jr.normal(jr.PRNGKey(2), (STATE,))
    dparams = jax.tree.map(jnp.ones_like, params)
    repeats = 3 if quick else 7

    checkpointed = make_loss(num_steps, checkpoints=8)
    plain = make_loss(num_steps, kind="lax")

    def jvp_of(f):
        return lambda p, y: jax.jvp(f, (p, y), (dparams, dy))

    def linearize_of(f):
        return lambda p, y: jax.linearize(f, p, y)[1](dparams, dy)

    def loss(p, y):
        return jnp.sum(checkpointed(p, y) ** 2)

    def grad(p, y):
        return jax.grad(loss, argnums=(0, 1))(p, y)

    def hvp(p, y):
        return jax.jvp(lambda y_: jax.grad(loss, argnums=1)(p, y_), (y,), (dy,))[1]

    def grad_of_grad(p, y):
        return jax.grad(lambda y_: jnp.sum(jax.grad(loss, argnums=1)(p, y_) ** 2))(y)

    first = measure_interleaved(
        {
            "jvp lax": jvp_of(plain),
            "jvp checkpointed": jvp_of(checkpointed),
            "linearize checkpointed": linearize_of(checkpointed),
        },
        params,
        y0,
        repeats=repeats,
        min_time=1.0,
    )
    second = measure_interleaved(
        {"grad": grad, "hessian-vector": hvp, "grad of grad": grad_of_grad},
        params,
        y0,
        repeats=repeats,
        min_time=1.0,
    )
    rows = [{"variant": k, **v} for k, v in {**first, **second}.items()]
    ratios = {
        "jvp checkpointed / jvp lax": first["jvp checkpointed"]["run_s"]
        / first["jvp lax"]["run_s"],
        "linearize / jvp (checkpointed)": first["linearize checkpointed"]["run_s"]
        / first["jvp checkpointed"]["run_s"],
        "hessian-vector / grad": second["hessian-vector"]["run_s"]
        / second["grad"]["run_s"],
        "grad of grad / grad": second["grad of grad"]["run_s"]
        / second["grad"]["run_s"],
    }
    print(
        f"# transformations: RK4 neural ODE, state {STATE}, width {WIDTH}, N={num_steps}; {machine()}"
    )
    print_table(rows, ["variant", "compile_s", "run_s", "run_cpu_s", "temp_bytes"])
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    print(
        f"jvp target (<= 1.3): {verdict(ratios['jvp checkpointed / jvp lax'] <= 1.3)}"
    )
    write_json("transformations", {"rows": rows, "ratios": ratios})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
