"""One of two processes joined by `jax.distributed` (run by test_multiprocess.py).

Each process has 2 CPU devices; the global mesh has 4. Prints the data-parallel
checkpointed gradient, which process 0 compares with the single-process one."""

import os
import sys


process_id, port = int(sys.argv[1]), int(sys.argv[2])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import loopax  # noqa: E402


jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=f"localhost:{port}",
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
)
mesh = jax.make_mesh((jax.device_count(),), ("x",))
sharding = NamedSharding(mesh, P("x", None))
y_global = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
w = np.linspace(-0.6, 0.5, 64, dtype=np.float32).reshape(8, 8)
y = jax.make_array_from_callback(y_global.shape, sharding, lambda idx: y_global[idx])
w = jax.device_put(w, NamedSharding(mesh, P()))


def loss(w, y):
    out = loopax.while_loop(
        lambda c: c[0] < 6,
        lambda c: (c[0] + 1, jnp.tanh(c[1] @ c[2]), c[2]),
        (0, y, w),
        kind="checkpointed",
        checkpoints=2,
    )[1]
    return jnp.sum(out**2)


with jax.set_mesh(mesh):
    g = jax.jit(jax.grad(loss))(w, y)
g = np.asarray(jax.device_get(g))
print("GRAD", process_id, " ".join(repr(float(v)) for v in g.ravel()), flush=True)
jax.distributed.shutdown()
