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

import jax
import jax.lax as lax

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

    def run(s: LoopState, level: int) -> LoopState:
        """`length` blocks of `length**level` steps, each skipped once the loop is
        done (`loop.cond` includes `step < max_steps`)."""
        if level == 0:
            block = loop.body
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
