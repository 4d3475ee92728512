"""`kind="bounded"`: nested `lax.scan`s with early exit, differentiated by plain JAX.

The loop runs as `lax.scan`s over blocks of `base**level` steps: a level-0 block is
one step, a level-`k` block is a scan over `base` blocks of level `k - 1`. Every block
(and every step) runs under a `lax.cond` on the unbatched flag `Loop.cond`, so once
the loop is done each remaining block costs one skipped `cond`, not its steps: the
cost follows the real trip count. Every scan over blocks of level 1 or more wraps its
body in `jax.checkpoint`, so reverse mode stores one carry per block of each level and
recomputes each step once per level, instead of storing every step. Everything is a
scan, a cond or a checkpoint, so `jvp`, `vjp`, `vmap` and their compositions
(`hessian`, grad of grad) all come from JAX's own rules.

The outermost scan is sized to `max_steps` (see `plan`) rather than rounding
`max_steps` up to a power of `base`, so cost, memory and compile time do not jump
when `max_steps` passes a power of `base`. The body is traced once: each scan, cond
and checkpoint traces its function once, and the levels nest.
"""

import functools as ft

import jax
import jax.lax as lax

from .._state import Loop, LoopState


def plan(max_steps: int, base: int) -> tuple[int, int]:
    """Choose the outermost scan: `count` blocks of `base**level` steps each.

    The level is the highest with `2 * base**level <= max_steps` (0 for loops shorter
    than `2 * base`), so `count = ceil(max_steps / base**level)` lies in
    `[2, 2 * base]`: `count - 1` full blocks and a last block that the step counter
    stops at exactly `max_steps` steps (its unused sub-blocks are skipped, one `cond`
    each). A step is recomputed `level` times by reverse mode and the outermost scan
    stores `count` carries, so:

    - `max_steps = base**k + 1` costs what `base**k` costs (one more block at the
      same depth), where rounding up to a power of `base` would add a whole level of
      recomputation and compile time;
    - the outermost scan stores at most `2 * base` carries, no more than an extra
      level of `base` would.

    **Arguments:**

    - `max_steps`: the bound on the number of steps, an int `>= 1`.
    - `base`: the length of every inner scan, an int `>= 2`.

    **Returns:**

    `(count, level)` with `(count - 1) * base**level < max_steps <= count *
    base**level`.
    """
    level = 0
    while 2 * base ** (level + 1) <= max_steps:
        level += 1
    count = -(-max_steps // base**level)
    return count, level


def bounded_while_loop(loop: Loop, *, base: int) -> LoopState:
    r"""Run `loop` as nested `lax.scan`s of length `base` with early exit.

    Supports `jit`, `vmap`, forward mode (`jvp`, `jacfwd`), reverse mode (`grad`,
    `vjp`, `jacrev`) and their compositions (`hessian`, grad of grad), all by JAX's
    own rules for `scan`, `cond` and `checkpoint`. With `count` and `level` from
    `plan` (about $\log_{base}$ `max_steps` levels), reverse mode stores `count`
    carries for the outermost scan and `base` for each inner checkpointed one, keeps
    the residuals of `base` steps at a time, and evaluates each step `level + 1` times
    in its forward sweeps (once, plus once per checkpointed level). The body is traced
    once, whatever the number of levels.

    **Arguments:**

    - `loop`: the rewritten loop; `loop.max_steps` must be an int.
    - `base`: the length of the inner scans, an int `>= 2`.

    **Returns:**

    The final `LoopState`.

    !!! note

        Buffers (`loop.is_buffer`) stay in the scanned carry, so under reverse mode
        each checkpointed level stores them along with the rest of the carry.
    """
    max_steps = loop.max_steps
    assert isinstance(max_steps, int), (
        "Internal error in loopax: kind='bounded' reached its backend without an int "
        "`max_steps`. Please report this as a bug."
    )
    state = loop.init()
    if max_steps == 0:
        return state

    def run(s: LoopState, count: int, level: int) -> LoopState:
        """`count` blocks of `base**level` steps, each skipped once the loop is done."""
        if level == 0:
            block = loop.body
        else:
            block = ft.partial(run, count=base, level=level - 1)

        def guarded_block(s: LoopState, _) -> tuple[LoopState, None]:
            return lax.cond(loop.cond(s), block, lambda s: s, s), None

        if level > 0:
            # Store only this scan's carries; recompute inside each block when needed.
            guarded_block = jax.checkpoint(guarded_block, prevent_cse=False)
        return lax.scan(guarded_block, s, length=count)[0]

    count, level = plan(max_steps, base)
    return run(state, count, level)
