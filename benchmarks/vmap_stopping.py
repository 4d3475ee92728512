"""Workload 3 of issue 6: `vmap` over initial states that stop at different times.

Question: a batch of 32 RK4 neural ODEs (state 64, MLP width 128, shared weights)
whose element b stops on `t >= t1_b`, the stopping steps spread evenly over
[N/2, N] (N = 1000; `--quick`: 200). Under `vmap` the predicate is batched: the loop
runs until every element is done, finished elements frozen. What do the forward pass
and the gradient (w.r.t. the weights and the 32 initial states) cost with

- `loopax.while_loop` (checkpointed, c=8 and the default `max_steps=N`),
- `equinox.internal.while_loop(kind="checkpointed")` at c=8 (and its default
  `checkpoints` for `max_steps=N`, which is O(sqrt(N))),
- a `lax.scan` of N steps that freezes finished elements with `jnp.where` and
  stores every step (the reference a user would write when N is known),
- `lax.while_loop` (forward only)?

All variants are compiled, then timed round by round in this process; ratios are
what to read (no target is set for this workload in issue 6). `--same-stop` makes
every element stop at N (the predicate is then the same for the whole batch), to
separate the cost of a batched predicate from that of `vmap` itself.

Run: `python benchmarks/vmap_stopping.py [--quick]`. Prints a table and writes
`benchmarks/results/vmap_stopping.json`.
"""

import argparse

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    machine,
    measure_interleaved,
    mlp_params,
    print_table,
    rk4_step,
    write_json,
)

import loopax
from loopax._schedule import default_checkpoints


STATE, WIDTH, BATCH = 64, 128, 32


def make_problem(num_steps: int, same_stop: bool = False):
    k_params, k3 = jr.split(jr.PRNGKey(0))
    params = mlp_params(k_params, STATE, WIDTH)
    y0s = jr.normal(k3, (BATCH, STATE))
    dt = 1.0 / num_steps
    # Element b stops after round(N/2 + b/(BATCH-1) * N/2) steps.
    stops = jnp.round(num_steps * (0.5 + 0.5 * jnp.arange(BATCH) / (BATCH - 1)))
    if same_stop:
        stops = jnp.full(BATCH, float(num_steps))
    t1s = (stops - 0.5) * dt

    def rk4(p, y):
        return rk4_step(p, y, dt)

    def make_loss(while_loop):
        def one(p, y0, t1):
            def body(carry):
                t, y = carry
                return t + dt, rk4(p, y)

            _, y = while_loop(lambda c: c[0] < t1, body, (jnp.array(0.0), y0))
            return jnp.sum(y**2)

        def loss(p, y0s):
            return jnp.sum(jax.vmap(one, in_axes=(None, 0, 0))(p, y0s, t1s))

        return loss

    def scan_loss(p, y0s):
        def one(y0, t1):
            def step(carry, _):
                t, y = carry
                running = t < t1
                new = (t + dt, rk4(p, y))
                return jax.tree.map(
                    lambda a, b: jnp.where(running, a, b), new, carry
                ), None

            return jnp.sum(
                lax.scan(step, (jnp.array(0.0), y0), None, num_steps)[0][1] ** 2
            )

        return jnp.sum(jax.vmap(one)(y0s, t1s))

    return params, y0s, stops, make_loss, scan_loss


def run(
    num_steps: int, *, repeats: int = 5, min_time: float = 1.0, same_stop: bool = False
) -> dict:
    params, y0s, stops, make_loss, scan_loss = make_problem(num_steps, same_stop)
    c_default = default_checkpoints(num_steps)

    def loopax_loop(checkpoints=None, max_steps=None):
        return lambda c, b, x: loopax.while_loop(
            c, b, x, checkpoints=checkpoints, max_steps=max_steps
        )

    def equinox_loop(checkpoints, max_steps):
        return lambda c, b, x: eqxi.while_loop(
            c, b, x, kind="checkpointed", checkpoints=checkpoints, max_steps=max_steps
        )

    forward = {
        "lax.while_loop": make_loss(lax.while_loop),
        "loopax c=8": make_loss(loopax_loop(8)),
        "equinox c=8": make_loss(equinox_loop(8, 4 * num_steps)),
        "lax.scan masked": scan_loss,
    }
    grad = lambda loss: jax.grad(loss, argnums=(0, 1))
    grads = {
        "loopax c=8": grad(make_loss(loopax_loop(8))),
        "equinox c=8": grad(make_loss(equinox_loop(8, 4 * num_steps))),
        f"loopax default (c={c_default})": grad(
            make_loss(loopax_loop(max_steps=num_steps))
        ),
        "equinox default (max_steps=N)": grad(make_loss(equinox_loop(None, num_steps))),
        "lax.scan masked (store all)": grad(scan_loss),
    }
    rows = []
    for group, fns in (("forward", forward), ("grad", grads)):
        results = measure_interleaved(
            fns, params, y0s, repeats=repeats, min_time=min_time
        )
        reference = results[
            "lax.while_loop" if group == "forward" else "lax.scan masked (store all)"
        ]
        for name, r in results.items():
            rows.append(
                {"N": num_steps, "group": group, "variant": name}
                | r
                | {
                    "run_ms": r["run_s"] * 1e3,
                    "temp_KiB": None
                    if r["temp_bytes"] is None
                    else r["temp_bytes"] / 1024,
                    "time/ref": r["run_s"] / reference["run_s"],
                    "cpu/ref": r["run_cpu_s"] / reference["run_cpu_s"],
                    "min/ref": r["run_min_s"] / reference["run_min_s"],
                }
            )

    def run_s(group, variant):
        return next(
            r["run_s"] for r in rows if (r["group"], r["variant"]) == (group, variant)
        )

    ratios = {
        "forward loopax / lax.while_loop": run_s("forward", "loopax c=8")
        / run_s("forward", "lax.while_loop"),
        "grad loopax / equinox (c=8)": run_s("grad", "loopax c=8")
        / run_s("grad", "equinox c=8"),
        "grad loopax c=8 / lax.scan masked": run_s("grad", "loopax c=8")
        / run_s("grad", "lax.scan masked (store all)"),
        "grad equinox c=8 / lax.scan masked": run_s("grad", "equinox c=8")
        / run_s("grad", "lax.scan masked (store all)"),
    }
    return {
        "rows": rows,
        "ratios": ratios,
        "stop_steps": [int(s) for s in stops],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 200")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--same-stop", action="store_true", help="every element stops at N"
    )
    args = parser.parse_args()
    num_steps = args.steps or (200 if args.quick else 1000)
    print(
        f"# vmap_stopping: batch {BATCH}, RK4 neural ODE state {STATE}, width {WIDTH}, "
        f"stops in [{num_steps if args.same_stop else num_steps // 2}, {num_steps}]; "
        f"{machine()}",
        flush=True,
    )
    out = run(num_steps, repeats=5 if args.quick else 9, same_stop=args.same_stop)
    print_table(
        out["rows"],
        [
            "N",
            "group",
            "variant",
            "compile_s",
            "run_ms",
            "temp_KiB",
            "time/ref",
            "cpu/ref",
            "min/ref",
        ],
    )
    print(
        "(time/ref: median wall clock, cpu/ref: process CPU time, min/ref: fastest "
        "run; forward vs lax.while_loop, grad vs the masked lax.scan)"
    )
    for key, value in out["ratios"].items():
        print(f"{key}: {value:.3f}")
    name = "vmap_stopping_same_stop" if args.same_stop else "vmap_stopping"
    meta = {"quick": args.quick, "N": num_steps, "same_stop": args.same_stop}
    path = write_json(name, meta | out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
