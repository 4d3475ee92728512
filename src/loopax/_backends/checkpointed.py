"""`kind="checkpointed"`: reverse mode through a loop of unknown length, in bounded memory.

Undifferentiated, this is a plain `lax.while_loop`. The loop is a JAX primitive
(`checkpointed_loop.py`; reverse mode in `checkpointed_partial_eval.py` and
`checkpointed_linear.py`) with rules for every transformation; `jax.jvp` runs one
loop over primals and tangents, and reverse mode is:

- **Forward sweep**: the same while loop, plus a checkpoint stack of `checkpoints`
  slots. After each step the *online* rule (`_schedule/online.py`) says whether to
  store the new state and into which slot; the store is a `lax.cond`, so steps that do
  not save do not touch the stack. Buffers are never stored; the final buffers are
  kept once.
- **Backward sweep**: one while loop with one VJP per iteration, driven by the
  *reverse* controller (`_schedule/reverse.py`): advance the current state with the
  plain body (storing it into a free slot when the offline revolve rule says so) up
  to the next VJP, run it, and restore the next state from a slot. The body is traced
  once for advancing and once for the VJP, whatever `checkpoints` is.

With `checkpoints >= max_steps` every step's linearization residuals are stored (like
`lax.scan`; no controller at all) and the backward sweep is a plain reversed loop of
transposed steps. The backward sweeps are built from the same primitive, so they
can be differentiated again (`grad` of `grad`) in bounded memory.
"""

from typing import Any

import jax.tree_util as jtu
import numpy as np

from .._schedule import default_checkpoints
from .._state import Loop
from . import checkpointed_partial_eval  # noqa: F401  (registers reverse mode)
from .checkpointed_loop import bind_loop
from .lax import lax_while_loop


_NEEDS_CHECKPOINTS = (
    "Reverse-mode differentiation of `loopax.while_loop(..., kind='checkpointed')` needs "
    "to know how many loop states it may store: pass `checkpoints=` (e.g. "
    "`checkpoints=16`) or `max_steps=` (then `checkpoints` defaults to "
    "ceil(log2(max_steps + 1)))."
)


def checkpointed_while_loop(
    loop: Loop,
    *,
    checkpoints: int | None,
    forward_slots: np.ndarray | None = None,
) -> Any:
    """Run `loop` as a `lax.while_loop` whose reverse mode uses `checkpoints` slots.

    `forward_slots`, for loops whose trip count is known up front (`loopax.scan`):
    an int32 array with one entry per step, `forward_slots[k - 1]` the slot to store
    `x_k` into or -1 (see `revolve_forward_slots`). The forward sweep then looks its
    decisions up in this table instead of running the online rule. The loop must run
    at most `len(forward_slots)` steps: `loop.max_steps` must equal it.

    A loop with per-step outputs (`Loop(has_outputs=True)`, `loopax.scan`'s `y`s)
    returns `(state, ys)`: the outputs stacked along a new leading axis of
    `loop.max_steps` rows (row `k` from step `k`). They are per-step outputs of the loop, not
    carried buffers: in reverse mode each step reads its own row of their cotangent,
    as `lax.scan` does, instead of carrying a buffer-sized cotangent through the
    backward sweep.

    References: Griewank & Walther (2000), *Algorithm 799: Revolve*; Stumm & Walther
    (2010), *New algorithms for optimal online checkpointing*; Wang, Moin & Iaccarino
    (2009), *Minimal repetition dynamic checkpointing* (full entries:
    docs/how-it-works.md, References).
    """
    if checkpoints is None:
        if loop.max_steps is None:
            return lax_while_loop(loop, reverse_mode_error=_NEEDS_CHECKPOINTS)
        checkpoints = default_checkpoints(loop.max_steps)
    store_all = loop.max_steps is not None and checkpoints >= loop.max_steps
    if store_all:
        checkpoints = max(1, loop.max_steps or 0)
        forward_slots = None
    if forward_slots is not None and (
        loop.max_steps is None or np.shape(forward_slots) != (loop.max_steps,)
    ):
        raise AssertionError(
            "loopax internal error: `forward_slots` must have one entry per step up "
            "to `max_steps`; please report a bug."
        )

    init_state = loop.init()
    if loop.max_steps == 0 and not loop.has_outputs:
        # No step can run. (Its per-step stacks would have no rows to write to.)
        return init_state
    leaves, state_def = jtu.tree_flatten(init_state)
    with_outputs = loop.has_outputs
    ys_def = jtu.tree_structure(loop.output_struct)

    def body(c):
        out = loop.body(jtu.tree_unflatten(state_def, c))
        if not with_outputs:
            return jtu.tree_leaves(out)
        state, ys = out
        return [*jtu.tree_leaves(state), *ys_def.flatten_up_to(ys)]

    out = bind_loop(
        lambda c: loop.cond(jtu.tree_unflatten(state_def, c)),
        body,
        leaves,
        is_buffer=(False, *loop.is_buffer),
        written_through_buffers=(False, *loop.written_through_buffers),
        checkpoints=checkpoints,
        store_all=store_all,
        max_steps=loop.max_steps,
        forward_slots=None if forward_slots is None else forward_slots.tolist(),
    )
    state = jtu.tree_unflatten(state_def, out[: len(leaves)])
    if not with_outputs:
        return state
    return state, jtu.tree_unflatten(ys_def, out[len(leaves) :])
