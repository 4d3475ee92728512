"""Checkpointed kind vs Equinox's checkpointed loop, `lax.while_loop` and `lax.scan`.

Workload: an RK4 neural ODE (state 64, MLP width 128), fixed step, `num_steps` steps,
stopping on `t >= t1` (so the trip count is only known at run time).

Questions answered (all as ratios measured side by side in this process):
- undifferentiated forward time of loopax vs `lax.while_loop` (target <= 1.02);
- gradient time vs `equinox.internal.while_loop(kind="checkpointed")` at the same
  `checkpoints` (target <= 0.8);
- gradient time with `checkpoints >= num_steps` vs a full-storage `lax.scan` (<= 1.15);
- XLA temp memory of the compiled gradient vs `(c + 3) * carry + 1 MiB`.

A second workload has a large state (2**20 float32, a cheap stencil body), where
memory traffic dominates: gradient time and temp memory vs Equinox at c in {4, 16}
(N = 1000 steps; 200 with `--quick`).

Run: `python benchmarks/against_equinox.py [--quick] [--large-steps N] [--large-only]`
(`--large-only`: the large-state workload alone; `neural_ode.py` covers the ODE at
more N and checkpoints).
"""

import argparse

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    compile_and_time,
    machine,
    measure_interleaved,
    mlp_params,
    print_table,
    rk4_step,
    stencil_grad,
    write_json,
)

import loopax


STATE, WIDTH = 64, 128


def make_problem(num_steps: int):
    k_params, k3 = jr.split(jr.PRNGKey(0))
    params = mlp_params(k_params, STATE, WIDTH)
    y0 = jr.normal(k3, (STATE,))
    dt = 1.0 / num_steps
    t1 = 1.0 - 0.5 * dt  # Stop on t >= t1: exactly num_steps steps.

    def rk4(p, y):
        return rk4_step(p, y, dt)

    def make_loss(while_loop):
        def loss(p, y0):
            def cond(carry):
                return carry[0] < t1

            def body(carry):
                t, y = carry
                return t + dt, rk4(p, y)

            _, y = while_loop(cond, body, (jnp.array(0.0), y0))
            return jnp.sum(y**2)

        return loss

    def scan_loss(p, y0, checkpoint_each_step=False):
        step = lambda y, _: (rk4(p, y), None)
        if checkpoint_each_step:
            step = jax.checkpoint(step)
        y = lax.scan(step, y0, None, length=num_steps)[0]
        return jnp.sum(y**2)

    return params, y0, make_loss, scan_loss


def main(quick: bool, large_steps: int | None = None, large_only: bool = False):
    if large_steps is None:
        large_steps = 200 if quick else 1000
    if large_only:
        # Three interleaved rounds even when quick: one round is at the mercy of load.
        large_rows = large_state(num_steps=large_steps, repeats=3)
        print_large(large_rows)
        ratios = {}
        for r in large_rows:
            c = r["checkpoints"]
            ratios[f"large state grad loopax / equinox (c={c})"] = r["time_ratio"]
            ratios[f"large state temp loopax / equinox (c={c})"] = r["temp_ratio"]
        for k, v in ratios.items():
            print(f"{k}: {v:.3f}")
        write_json(
            "against_equinox", {"rows": [], "large_state": large_rows, "ratios": ratios}
        )
        return
    num_steps = 1000
    params, y0, make_loss, scan_loss = make_problem(num_steps)
    grad = lambda loss: jax.grad(loss, argnums=(0, 1))
    carry_bytes = 4 * (STATE + 1)
    rows = []

    def measure(name, fn, **extra):
        compile_s, run_s, temp = compile_and_time(
            fn, params, y0, repeats=3 if quick else 7
        )
        rows.append(
            {
                "variant": name,
                "compile_s": compile_s,
                "run_s": run_s,
                "temp_bytes": temp,
                **extra,
            }
        )
        return run_s

    lax_fwd = measure(
        "forward lax.while_loop", make_loss(lambda c, b, x: lax.while_loop(c, b, x))
    )
    lx_fwd = measure(
        "forward loopax c=8",
        make_loss(lambda c, b, x: loopax.while_loop(c, b, x, checkpoints=8)),
    )
    ratios = {"forward loopax / lax.while_loop": lx_fwd / lax_fwd}
    for c in [8, 32]:
        ours = measure(
            f"grad loopax c={c}",
            grad(
                make_loss(
                    lambda cf, b, x, c=c: loopax.while_loop(cf, b, x, checkpoints=c)
                )
            ),
        )
        theirs = measure(
            f"grad equinox c={c}",
            grad(
                make_loss(
                    lambda cf, b, x, c=c: eqxi.while_loop(
                        cf,
                        b,
                        x,
                        kind="checkpointed",
                        checkpoints=c,
                        max_steps=4 * num_steps,
                    )
                )
            ),
        )
        ratios[f"grad loopax / equinox (c={c})"] = ours / theirs
    full = measure(
        f"grad loopax c={num_steps}",
        grad(
            make_loss(
                lambda cf, b, x: loopax.while_loop(
                    cf, b, x, checkpoints=num_steps, max_steps=num_steps
                )
            )
        ),
    )
    scan = measure("grad lax.scan (store all)", grad(scan_loss))
    measure(
        "grad lax.scan + checkpoint per step", grad(lambda p, y: scan_loss(p, y, True))
    )
    ratios["grad loopax store-all / lax.scan"] = full / scan
    large_rows = large_state(num_steps=large_steps, repeats=1 if quick else 3)
    for r in large_rows:
        c = r["checkpoints"]
        ratios[f"large state grad loopax / equinox (c={c})"] = r["time_ratio"]
        ratios[f"large state temp loopax / equinox (c={c})"] = r["temp_ratio"]

    print(
        f"# against_equinox: RK4 neural ODE, state {STATE}, width {WIDTH}, N={num_steps}; {machine()}"
    )
    print(f"# carry bytes: {carry_bytes}")
    print_table(rows, ["variant", "compile_s", "run_s", "temp_bytes"])
    print_large(large_rows)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    write_json(
        "against_equinox", {"rows": rows, "large_state": large_rows, "ratios": ratios}
    )


def print_large(large_rows: list[dict]) -> None:
    print(
        "# large state (2**20 float32, stencil body); temp memory in units of the carry"
    )
    print_table(
        large_rows,
        [
            "checkpoints",
            "num_steps",
            "loopax_s",
            "equinox_s",
            "time_ratio",
            "cpu_time_ratio",
            "loopax_temp_carries",
            "equinox_temp_carries",
            "bound_c_plus_3",
        ],
    )


def large_state(num_steps: int, repeats: int, checkpoints=(4, 16)) -> list[dict]:
    size = 2**20
    carry_bytes = 4 * size + 4

    def make(while_loop):
        return stencil_grad(while_loop, num_steps)

    y0 = jnp.ones(size)
    rows = []
    for c in checkpoints:
        # Interleaved: one run of each per round, so load changes hit both alike.
        out = measure_interleaved(
            {
                "loopax": make(
                    lambda cf, b, x, c=c: loopax.while_loop(cf, b, x, checkpoints=c)
                ),
                "equinox": make(
                    lambda cf, b, x, c=c: eqxi.while_loop(
                        cf,
                        b,
                        x,
                        kind="checkpointed",
                        checkpoints=c,
                        max_steps=4 * num_steps,
                    )
                ),
            },
            y0,
            repeats=repeats,
            min_time=0,
        )
        ours, theirs = out["loopax"], out["equinox"]
        rows.append(
            {
                "checkpoints": c,
                "num_steps": num_steps,
                "loopax_s": ours["run_s"],
                "equinox_s": theirs["run_s"],
                "time_ratio": ours["run_s"] / theirs["run_s"],
                "cpu_time_ratio": ours["run_cpu_s"] / theirs["run_cpu_s"],
                "loopax_compile_s": ours["compile_s"],
                "equinox_compile_s": theirs["compile_s"],
                "loopax_temp_carries": ours["temp_bytes"] / carry_bytes,
                "equinox_temp_carries": theirs["temp_bytes"] / carry_bytes,
                "bound_c_plus_3": c + 3,
                "temp_ratio": ours["temp_bytes"] / theirs["temp_bytes"],
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--large-steps", type=int, default=None, help="N of the large-state workload"
    )
    parser.add_argument(
        "--large-only", action="store_true", help="only the large-state workload"
    )
    args = parser.parse_args()
    main(args.quick, args.large_steps, args.large_only)
