"""Shared test utilities: tolerance comparison and independent reference loops."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


KINDS = ("lax", "checkpointed", "bounded")
REVERSE_KINDS = ("checkpointed", "bounded")


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    """Same structure, shapes and dtypes, and values within tolerance."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype == jax.dtypes.float0:
            continue
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def scan_reference_loop(cond_fun, body_fun, init_val, max_steps):
    """Full-storage reference: `lax.scan` over `max_steps` of `lax.cond`. Reverse-mode
    differentiable by plain JAX, independent of every loopax backend."""

    def step(carry, _):
        keep = cond_fun(carry)
        return lax.cond(keep, body_fun, lambda c: c, carry), None

    return lax.scan(step, init_val, None, length=max_steps)[0]

