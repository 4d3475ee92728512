"""Primitives that see through `jax.vmap`.

A loop under `vmap` may have a *batched* predicate: each batch element wants its own
trip count. Every loopax backend runs the batch in lock-step instead (one schedule,
one step counter, one set of checkpoints), so it needs two things a normal JAX
function cannot express:

- `unvmap_any(pred)`: "does *any* batch element want to continue?" as an unbatched
  flag, whatever vmaps are wrapped around the call;
- `active_mask(pred)`: the per-element predicate where it is batched, and the
  constant `True` where it is not, so that freezing finished elements with
  `where(active_mask(pred), new, old)` folds away entirely outside `vmap`.

Both are identity-like on unbatched inputs and only differ in their batching rules.
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool

from ._jax_internals import Primitive, define_primitive, invariant_aval, zero_like


def _unvmap_any_batch(args, dims):
    (x,), (dim,) = args, dims
    return jnp.any(x, axis=dim), None  # None: not mapped


def _active_mask_batch(args, dims):
    (x,), (dim,) = args, dims
    # Batched: the real per-element predicate. (Unbatched inputs never reach here.)
    # Typed invariant over `shard_map`'s mesh axes, as the unbatched mask is: the
    # loop body was traced with that type (a frozen replicated leaf stays typed
    # replicated), exactly as JAX types the carry of a `while_loop` whose batched
    # predicate differs per device.
    return _invariant_mask_p.bind(x), dim


def _invariant_mask_batch(args, dims):
    (x,), (dim,) = args, dims
    return _invariant_mask_p.bind(x), dim


def _bool_primitive(name: str, impl, batch, abstract_eval=lambda x: x) -> Primitive:
    """A boolean identity-like primitive with no tangent."""

    def jvp(primals, tangents):
        del tangents
        out = primitive.bind(*primals)
        return out, zero_like(out)

    primitive = define_primitive(
        name, impl=impl, abstract_eval=abstract_eval, jvp=jvp, batch=batch
    )
    return primitive


_invariant_mask_p = _bool_primitive(
    "loopax_invariant_mask",
    lambda x: x,
    _invariant_mask_batch,
    abstract_eval=invariant_aval,
)
unvmap_any_p = _bool_primitive("loopax_unvmap_any", lambda x: x, _unvmap_any_batch)
active_mask_p = _bool_primitive(
    "loopax_active_mask",
    # Unbatched: the constant `True`, invariant over `shard_map`'s mesh axes even
    # where `pred` varies (a per-device trip count needs no freezing: each device
    # runs its own loop), so the freeze folds away and types nothing as varying.
    lambda x: jnp.ones(jnp.shape(x), jnp.bool_),
    _active_mask_batch,
    abstract_eval=invariant_aval,
)


def unvmap_any(pred: Bool[ArrayLike, ""]) -> Bool[Array, ""]:
    """`True` if any element of a (possibly vmapped) boolean is `True`; unbatched."""
    return unvmap_any_p.bind(jnp.asarray(pred, dtype=bool))


def active_mask(pred: Bool[ArrayLike, ""]) -> Bool[Array, ""]:
    """`pred` where it is batched by `vmap`; the constant `True` where it is not."""
    return active_mask_p.bind(jnp.asarray(pred, dtype=bool))
