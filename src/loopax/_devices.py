"""Loops whose values vary over `shard_map`'s mesh axes.

Inside `jax.shard_map` a value that differs between devices is *varying* over the
mesh axes it differs along, and JAX casts an invariant (replicated) value to
varying with `pvary` wherever the two meet. The transpose of that cast is a `psum`
over the devices. When the cast sits inside a loop body, reverse mode therefore
sums the cotangent of every replicated input the body uses over all devices once
per backward step:

- with a trip count that differs per device (a predicate that varies), the devices
  run different numbers of backward steps and the collective either deadlocks or
  sums cotangents of different steps: a wrong gradient;
- with the same trip count everywhere (data parallel), the gradient is right but
  pays one all-reduce per step.

`vary_consts` moves the cast out of the loop: each replicated input of inexact
dtype that the body mixes with varying values is cast to varying once, before the
loop, and the body is re-evaluated on the cast values (`eval_jaxpr_varying`, where
the casts inside become no-ops). The cotangent then accumulates per device inside
the loop, and the `psum` (the transpose of the one cast) runs once, after it.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp

from ._jax_internals import CannotVary, varying_axes


VARYING_TRIP_COUNT_ERROR = (
    "loopax cannot differentiate this loop in reverse mode: inside `jax.shard_map` its "
    "trip count differs between devices (the predicate varies over the mesh axes "
    "{axes}), and the loop body mixes a replicated (invariant) value of the carry "
    "with per-device values, so its cotangent would need a sum over devices inside "
    "the backward loop, which the devices run different numbers of times. Make that "
    "carry leaf per-device before the loop: `jax.lax.pcast(x, {axes}, "
    "to='varying')` (and combine the per-device results after the loop, e.g. with "
    "`jax.lax.psum`)."
)


def loop_axes(avals: Sequence[Any]) -> tuple[str, ...]:
    """The mesh axes any of `avals` (the predicate and the carry) varies over."""
    return tuple(sorted({a for aval in avals for a in varying_axes(aval)}))


def vary(x: Any, axes: Sequence[str]) -> Any:
    """`x` cast to varying over those of `axes` it does not vary over yet, if it
    can have a cotangent (inexact dtype); otherwise `x`."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return x
    missing = tuple(a for a in axes if a not in varying_axes(jax.typeof(x)))
    return lax.pcast(x, missing, to="varying") if missing else x


def vary_consts(consts: Sequence[Any], axes: Sequence[str]) -> list | None:
    """`consts` cast to vary over `axes`, or `None` if none needed casting."""
    new = [vary(c, axes) for c in consts]
    if all(a is b for a, b in zip(new, consts, strict=True)):
        return None
    return new


__all__ = ["CannotVary", "VARYING_TRIP_COUNT_ERROR", "loop_axes", "vary", "vary_consts"]
