"""Multiple devices: collectives inside loop bodies and temp memory per device.

Question: on 8 (simulated CPU) devices, how many collectives does each gradient run
*inside* its loops (they cost a synchronisation per step, and deadlock when devices
run different trip counts), and how much temporary memory does each device need,
against one device's figure divided by 8? Competitors: `lax.scan` (every step
stored) and Equinox's checkpointed loop, in the same process.

Cases (a 2-layer tanh MLP step, batch 64, width 256, 32 steps, 4 checkpoints):

- `data/auto`: batch sharded over 8 devices, weights replicated, sharding
  propagated by XLA (`jit` of sharded inputs);
- `data/shard_map`: the same inside `jax.shard_map` (loss summed with `psum`);
- `model/auto`: weights' hidden dimension sharded, batch replicated.

Run: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/multidevice.py`
(the script sets the flag itself when run directly).
"""

import functools as ft
import json
import os
import sys


if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import equinox.internal as eqxi  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import loopax  # noqa: E402


sys.path.insert(0, os.path.dirname(__file__))
# The HLO reader the multi-device tests use, so both count collectives alike.
sys.path.insert(
    0, os.path.join(os.path.dirname(__file__), "..", "tests", "multidevice")
)
from _common import RESULTS_DIR, machine  # noqa: E402
from hlo_collectives import collectives_in_loops  # noqa: E402


BATCH, WIDTH, STEPS, CHECKPOINTS = 64, 256, 32, 4


def step(w, y):
    w1, w2 = w
    return jnp.tanh(jnp.tanh(y @ w1) @ w2)


def loop(kind, w, y):
    if kind == "lax.scan":
        return jax.lax.scan(lambda c, _: (step(w, c), None), y, length=STEPS)[0]
    if kind == "loopax.scan":
        f = lambda c, _: (step(w, c), None)  # noqa: E731
        return loopax.scan(f, y, length=STEPS, checkpoints=CHECKPOINTS)[0]
    if kind == "loopax checkpointed":
        return loopax.while_loop(
            lambda c: c[0] < STEPS,
            lambda c: (c[0] + 1, step(w, c[1])),
            (0, y),
            kind="checkpointed",
            checkpoints=CHECKPOINTS,
        )[1]
    if kind == "equinox checkpointed":
        return eqxi.while_loop(
            lambda c: c[0] < STEPS,
            lambda c: (c[0] + 1, step(w, c[1])),
            (0, y),
            kind="checkpointed",
            checkpoints=CHECKPOINTS,
            max_steps=STEPS,
        )[1]
    raise ValueError(kind)


def single_loss(kind, w, y):
    return jnp.sum(loop(kind, w, y) ** 2)


KINDS = ("lax.scan", "loopax checkpointed", "loopax.scan", "equinox checkpointed")


def grad_fn(kind, case, mesh):
    def loss(w, y):
        return jnp.sum(loop(kind, w, y) ** 2)

    if case == "data/shard_map":

        def local(w, y):
            return jax.lax.psum(loss(w, y), "x")

        return jax.jit(
            jax.grad(
                jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x")), out_specs=P())
            )
        )
    return jax.jit(jax.grad(loss))


def measure(fn, *args):
    compiled = fn.lower(*args).compile()
    memory = compiled.memory_analysis()
    return collectives_in_loops(compiled.as_text()), memory.temp_size_in_bytes


def main():
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("x",), axis_types=(AxisType.Auto,))
    w = (
        jnp.full((WIDTH, WIDTH), 0.01) + jnp.eye(WIDTH) * 0.5,
        jnp.full((WIDTH, WIDTH), -0.01) + jnp.eye(WIDTH) * 0.5,
    )
    y = jnp.linspace(-1.0, 1.0, BATCH * WIDTH).reshape(BATCH, WIDTH)
    specs = {
        "data/auto": (P(), P("x", None)),
        "data/shard_map": (P(), P("x", None)),
        "model/auto": (P(None, "x"), P()),
    }
    rows = []
    for case, (w_spec, y_spec) in specs.items():
        w_sharding = NamedSharding(mesh, w_spec)
        ws = jax.tree.map(ft.partial(jax.device_put, device=w_sharding), w)
        ys = jax.device_put(y, NamedSharding(mesh, y_spec))
        for kind in KINDS:
            one = jax.jit(jax.grad(ft.partial(single_loss, kind)))
            _, temp_one = measure(one, w, y)
            try:
                count, temp = measure(grad_fn(kind, case, mesh), ws, ys)
            except Exception as e:  # e.g. Equinox's loop under `shard_map`.
                print(f"{case:15s} {kind:22s} fails: {type(e).__name__}", flush=True)
                rows.append(dict(case=case, kind=kind, error=type(e).__name__))
                continue
            rows.append(
                dict(
                    case=case,
                    kind=kind,
                    collectives_in_loops=count,
                    temp_per_device=temp,
                    temp_one_device=temp_one,
                    ratio=temp / (temp_one / n),
                )
            )
            r = rows[-1]
            print(
                f"{case:15s} {kind:22s} collectives in loops {count:3d}   temp/device "
                f"{temp / 2**20:7.2f} MiB   one device / {n}: {temp_one / n / 2**20:6.2f} MiB"
                f"   ratio {r['ratio']:.2f}",
                flush=True,
            )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "multidevice.json"
    out.write_text(json.dumps(dict(machine=machine(), devices=n, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
