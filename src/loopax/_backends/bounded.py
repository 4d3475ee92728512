"""`kind="bounded"`: nested `lax.scan`s with early exit, differentiated by plain JAX.

The loop runs as `depth` nested `lax.scan`s, all of the same `length` (see `plan`):
a level-0 block is one step, a level-`k` block is a scan over `length` blocks of
level `k - 1`. Every block (and every step) runs under a `lax.cond` on the unbatched
flag `Loop.cond`, which is false once the loop is done *or* its step counter has
reached `max_steps`. So:

- the body is called at most `max_steps` times, exactly: `max_steps` is decomposed
  in mixed radix over the levels at run time (the counter stops the loop inside the
  right block of every level), not rounded up to a power of `base`;
- once the loop is done each remaining block costs one skipped `cond`, not its
  steps: the cost follows the real trip count.

Every scan over blocks of level 1 or more wraps its body in `jax.checkpoint`, so
reverse mode stores one carry per block of each level and recomputes each step once
per checkpointed level, instead of storing every step. The innermost scan's step is
wrapped in a `jax.checkpoint` that saves everything (see `bounded_while_loop`), so
that the closed-over parameters are not stacked once per step. Everything is a scan, a cond or
a checkpoint, so `jvp`, `vjp`, `vmap` and their compositions (`hessian`, grad of
grad) all come from JAX's own rules. The body is traced once: each scan, cond and
checkpoint traces its function once, and the levels nest.
"""

import functools as ft
from collections.abc import Callable

import jax
import jax.lax as lax
import jax.tree_util as jtu

from .._devices import VARYING_TRIP_COUNT_ERROR, loop_axes, vary_consts
from .._forward_only import forward_only
from .._jax_internals import (
    CannotVary,
    eval_jaxpr_varying,
    pvary_sources,
    varying_axes,
    with_consts,
)
from .._schedule import bounded_plan as plan
from .._state import Loop, LoopState


_save_everything = jax.checkpoint_policies.everything_saveable


def bounded_while_loop(loop: Loop, *, base: int) -> LoopState:
    r"""Run `loop` as nested `lax.scan`s with early exit.

    Supports `jit`, `vmap`, forward mode (`jvp`, `jacfwd`), reverse mode (`grad`,
    `vjp`, `jacrev`) and their compositions (`hessian`, grad of grad), all by JAX's
    own rules for `scan`, `cond` and `checkpoint`. With `length` and `depth` from
    `plan` (about $\log_{base}$ `max_steps` levels of about `base` each), reverse mode
    stores `length` carries per checkpointed level, keeps the residuals of `length`
    steps at a time, and evaluates each step `depth` times in its forward sweeps. The
    body is traced once and called at most `max_steps` times.

    **Arguments:**

    - `loop`: the rewritten loop; `loop.max_steps` must be an int.
    - `base`: sets the nesting depth (see `plan`), an int `>= 2`.

    **Returns:**

    The final `LoopState`.

    !!! note

        Buffers (`loop.is_buffer`) stay in the scanned carry, so under reverse mode
        each checkpointed level stores them along with the rest of the carry.

    !!! note

        Under reverse mode a `jax.debug.callback` in the body runs `depth + 1` times
        per step: JAX replays the effects of the innermost (save-everything)
        checkpoint in the backward pass, although it recomputes no values there.
    """
    max_steps = loop.max_steps
    assert isinstance(max_steps, int), (
        "Internal error in loopax: kind='bounded' reached its backend without an int "
        "`max_steps`. Please report this as a bug."
    )
    state = loop.init()
    if max_steps == 0:
        return state
    length, depth = plan(max_steps, base)
    state, step_fn = _vary_over_devices(loop, state)

    def run(s: LoopState, level: int) -> LoopState:
        """`length` blocks of `length**level` steps, each skipped once the loop is
        done (`loop.cond` includes `step < max_steps`)."""
        if level == 0:
            block = step_fn
        else:
            block = ft.partial(run, level=level - 1)

        def guarded_block(s: LoopState, _) -> tuple[LoopState, None]:
            return lax.cond(loop.cond(s), block, lambda s: s, s), None

        if level > 0:
            # Store only this scan's carries; recompute inside each block when needed.
            guarded_block = jax.checkpoint(guarded_block, prevent_cse=False)
        else:
            # Saves everything, recomputes nothing: only makes JAX partially evaluate
            # the step by its rematerialisation rules, which hand the step's
            # loop-invariant inputs (closed-over parameters) to the backward pass as
            # they are. The ordinary rule for `cond` would make them per-step
            # residuals, which the scan stacks: a copy of the parameters per step.
            guarded_block = jax.checkpoint(
                guarded_block, prevent_cse=False, policy=_save_everything
            )
        return lax.scan(guarded_block, s, length=length)[0]

    return run(state, depth - 1)


def _vary_over_devices(loop: Loop, state: LoopState) -> tuple[LoopState, Callable]:
    """Inside `shard_map`: the step with its replicated constants cast to varying
    once, outside the scans (see `_devices.py`), so reverse mode sums their
    cotangents over devices after the loop, not in every step (nor inside a
    `cond` some devices skip). Where the trip count differs per device and a
    replicated carry leaf would still need such a sum, differentiating that leaf
    raises a clear error instead of deadlocking. Elsewhere: `loop.body`."""
    if not jax.sharding.get_abstract_mesh().manual_axes:
        return state, loop.body  # Not inside `shard_map`: nothing varies.
    leaves, treedef = jtu.tree_flatten(state)
    cond = jax.make_jaxpr(loop.cond)(state)
    axes = loop_axes([*cond.out_avals, *(jax.typeof(x) for x in leaves)])
    if not axes:
        return state, loop.body
    pred_varies = bool(varying_axes(cond.out_avals[0]))
    jaxpr = jax.make_jaxpr(loop.body)(state)
    step_fn = loop.body
    varied = vary_consts(jaxpr.consts, axes)
    if varied is not None:

        def hoisted(s: LoopState) -> LoopState:
            out = eval_jaxpr_varying(with_consts(jaxpr, varied), *jtu.tree_leaves(s))
            return jtu.tree_unflatten(treedef, out)

        try:
            new = jax.make_jaxpr(hoisted)(state)
        except CannotVary:
            new = None
        if new is not None and [varying_axes(a) for a in new.out_avals] == [
            varying_axes(jax.typeof(x)) for x in leaves
        ]:
            jaxpr, step_fn = new, hoisted
    if pred_varies:
        message = VARYING_TRIP_COUNT_ERROR.format(axes=varying_axes(cond.out_avals[0]))
        leaves = [
            forward_only(x, message)
            if pvary_sources(jaxpr, [j == i for j in range(len(leaves))])
            else x
            for i, x in enumerate(leaves)
        ]
        state = jtu.tree_unflatten(treedef, leaves)
    return state, step_fn
