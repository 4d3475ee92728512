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

from .._state import Loop, LoopState


_save_everything = jax.checkpoint_policies.everything_saveable


def plan(max_steps: int, base: int) -> tuple[int, int]:
    """Choose the nested scans: `depth` levels, each a scan of `length` blocks.

    `depth` is the fewest levels with `max_steps < 2 * base**depth` (1 for loops
    shorter than `2 * base`), and `length` the smallest with `length**depth >=
    max_steps`. A flat loop (`depth == 1`) is one scan of exactly `max_steps` steps.

    Why these choices:

    - The depth sets the cost of reverse mode: each step is evaluated `depth` times in
      forward sweeps (once, plus once per checkpointed level). Rounding `max_steps`
      up to a power of `base` (Equinox's rule) adds a level, a whole recomputation,
      just past each power; here a level is added only at `2 * base**k`, so
      `max_steps = base**k + 1` costs what `base**k` costs.
    - Every level has the same length, so the scans JAX builds for reverse mode have
      the same shapes at every level and share their lowered helper functions: with
      one level of a different length, compiling a gradient took ~10% longer
      (`base=16`, two levels of 16 under one of 4, 8, 15, 17 or 32). The bound stays
      exact without remainder scans of other lengths: the step counter stops the
      loop after `max_steps` calls, and the slots of the `length**depth` past
      `max_steps` are never run (each remaining block is one skipped `cond`).
    - `length <= ceil(2**(1 / depth) * base)`: reverse mode stores at most about
      `1.42 * base` carries per level.

    **Arguments:**

    - `max_steps`: the bound on the number of steps, an int `>= 1`.
    - `base`: sets the depth, as above; an int `>= 2`.

    **Returns:**

    `(length, depth)` with `(length - 1)**depth < max_steps <= length**depth`.
    """
    depth = 1
    while 2 * base**depth <= max_steps:
        depth += 1
    length = max(1, round(max_steps ** (1 / depth)))
    while length**depth < max_steps:  # Correct the float root, in exact integers.
        length += 1
    while length > 1 and (length - 1) ** depth >= max_steps:
        length -= 1
    return length, depth


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
