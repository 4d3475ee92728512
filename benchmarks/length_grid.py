"""Gradient time over loop length x checkpoints, vs Equinox's checkpointed loop.

Question (issue #19): does the forward sweep's online placement rule keep the gradient
fast on long loops with many checkpoints? Past the trace-time table of the first 1024
steps the rule used to cost O(c) per step; now it costs one plan per store (a few
dozen revolve costs, whatever c, when the stretches allow it) and O(1) per
step between stores.

Workloads, both `while_loop`s stopping on `t >= t1` (trip count known only at run
time, no `max_steps`):
- `ode`: an RK4 neural ODE, state 64, MLP width 128;
- `tiny`: explicit Euler on a 16 -> 64 -> 16 MLP vector field.

At each (N, c), measured side by side in this process, interleaved, medians:
- `loopax`: `jax.grad` through `loopax.while_loop(..., checkpoints=c)`;
- `equinox`: the same through `equinox.internal.while_loop(kind="checkpointed")`;
- `scan` (tiny only): `loopax.scan(kind="checkpointed", checkpoints=c, length=N)`;
- `fwd` / `fwd_vjp` (with `--forward`): a plain forward vs the forward under `jax.vjp`
  (the recording sweep; the VJP function is returned so it is not dead code);
- `old` (with `--old-src DIR`): `loopax` imported from another source tree, as
  `loopax_old` (copy `src/loopax` of the previous version to `DIR/loopax_old`); with
  `--forward` also its forward under `jax.vjp` (`old_fwd_vjp`).

Targets: loopax / equinox <= 0.8 (ode), <= 1.0 (tiny); tiny loopax / scan <= 1.2;
fwd_vjp / fwd <= 1.1. Pin to one core (`taskset -c 1`) on a shared machine.

Run: `python benchmarks/length_grid.py [--quick] [--workload ode|tiny|both]
[--steps 1000 5000] [--checkpoints 8 64] [--forward] [--old-src DIR]`.
`--quick`: N in {1000, 5000}, c in {8, 64}, tiny body, 3 rounds.
"""

import argparse
import importlib
import sys

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import machine, measure_interleaved, mlp_params, print_table, write_json

import loopax


def make_workload(name: str, num_steps: int):
    key_params, key_y = jr.split(jr.PRNGKey(0))
    state, width = (64, 128) if name == "ode" else (16, 64)
    params = mlp_params(key_params, state, width)
    y0 = jr.normal(key_y, (state,))
    dt = 1.0 / num_steps
    t1 = 1.0 - 0.5 * dt  # Stop on t >= t1: exactly num_steps steps.

    def field(p, y):
        return p["w2"] @ jnp.tanh(p["w1"] @ y)

    def advance(p, y):
        if name == "tiny":
            return y + dt * field(p, y)
        k1 = field(p, y)
        k2 = field(p, y + 0.5 * dt * k1)
        k3 = field(p, y + 0.5 * dt * k2)
        k4 = field(p, y + dt * k3)
        return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def make_loss(while_loop):
        def loss(p, y0):
            def cond(carry):
                return carry[0] < t1

            def body(carry):
                t, y = carry
                return t + dt, advance(p, y)

            _, y = while_loop(cond, body, (jnp.array(0.0), y0))
            return jnp.sum(y**2)

        return loss

    def scan_loss(checkpoints):
        def loss(p, y0):
            def f(y, _):
                return advance(p, y), None

            y, _ = loopax.scan(
                f,
                y0,
                None,
                length=num_steps,
                kind="checkpointed",
                checkpoints=checkpoints,
            )
            return jnp.sum(y**2)

        return loss

    return params, y0, make_loss, scan_loss


def grid_point(workload, num_steps, checkpoints, *, forward, old, rounds):
    params, y0, make_loss, scan_loss = make_workload(workload, num_steps)
    grad = lambda loss: jax.grad(loss)
    c = checkpoints

    def ours(module):
        return make_loss(
            lambda cond, body, x: module.while_loop(cond, body, x, checkpoints=c)
        )

    fns = {
        "loopax": grad(ours(loopax)),
        "equinox": grad(
            make_loss(
                lambda cond, body, x: eqxi.while_loop(
                    cond, body, x, kind="checkpointed", checkpoints=c
                )
            )
        ),
    }
    if workload == "tiny":
        fns["scan"] = grad(scan_loss(c))
    if old is not None:
        fns["old"] = grad(ours(old))
    if forward:
        fns["fwd"] = make_loss(lambda cond, body, x: jax.lax.while_loop(cond, body, x))
        fns["fwd_vjp"] = lambda p, y: jax.vjp(ours(loopax), p, y)
        if old is not None:
            fns["old_fwd_vjp"] = lambda p, y: jax.vjp(ours(old), p, y)
    out = measure_interleaved(fns, params, y0, repeats=rounds, min_time=0.0)
    row = {"workload": workload, "N": num_steps, "c": c}
    for name, r in out.items():
        row[f"{name}_s"] = r["run_s"]
    row["loopax/eqx"] = out["loopax"]["run_s"] / out["equinox"]["run_s"]
    if "scan" in out:
        row["loopax/scan"] = out["loopax"]["run_s"] / out["scan"]["run_s"]
    if "old" in out:
        row["loopax/old"] = out["loopax"]["run_s"] / out["old"]["run_s"]
    if forward:
        row["fwd_vjp/fwd"] = out["fwd_vjp"]["run_s"] / out["fwd"]["run_s"]
        if old is not None:
            row["old fwd_vjp/fwd"] = out["old_fwd_vjp"]["run_s"] / out["fwd"]["run_s"]
    print_table([row], list(row))
    sys.stdout.flush()
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workload", choices=["ode", "tiny", "both"], default="both")
    parser.add_argument("--steps", type=int, nargs="*")
    parser.add_argument("--checkpoints", type=int, nargs="*")
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--old-src", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    steps = args.steps or ([1000, 5000] if args.quick else [1000, 5000, 20000])
    checkpoints = args.checkpoints or ([8, 64] if args.quick else [8, 64, 1000])
    workloads = (
        ["tiny"]
        if args.quick and args.workload == "both"
        else (["ode", "tiny"] if args.workload == "both" else [args.workload])
    )
    old = None
    if args.old_src is not None:
        sys.path.insert(0, args.old_src)
        old = importlib.import_module("loopax_old")
    print(machine())
    rows = [
        grid_point(
            w,
            n,
            c,
            forward=args.forward,
            old=old,
            rounds=3 if args.quick else args.rounds,
        )
        for w in workloads
        for n in steps
        for c in checkpoints
    ]
    write_json("length_grid", {"rows": rows, "machine": machine()})


if __name__ == "__main__":
    main()
