"""The backward sweep: reverse the loop from the checkpoints the forward sweep left.

After the forward sweep the trip count `n` is known. The backward sweep takes the
segments between stored states from the last to the first and reverses each one
optimally with the slots that are free at that time (Griewank and Walther's revolve, see
`offline.py`): it restores the segment's first state, advances to the split point
`revolve_split` gives, stores that state, and recurses on the tail and then on the head.
A slot is freed as soon as the VJP of the step it holds has run.

The controller is a state machine that emits one body evaluation per call (an advance or
a VJP), written against an array namespace `xp` (`numpy` or `jax.numpy`) so that the
same code runs eagerly in `loopax.schedule(...)` and traced in the compiled backward
loop.
"""

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .offline import cond, revolve_split


class ReverseAction(NamedTuple):
    """One body evaluation of the backward sweep.

    - `is_vjp`: bool. If false, advance: `cur = f(cur)`, from `x_step` to `x_{step+1}`;
        then, if `store_slot >= 0`, `slots[store_slot] = cur`. If true, run the VJP of
        step `step` at `cur`; then `cur = slots[restore_slot]` (`x_0` when
        `restore_slot == -1`), unless `step == 0`.
    - `step`: int32, the index `k` of the state `x_k` the body is applied to.
    - `store_slot`: int32, the slot to store the advanced state into, or -1.
    - `restore_slot`: int32, the slot to load the next state from after a VJP, or -1 for
        `x_0`.
    """

    is_vjp: Any
    step: Any
    store_slot: Any
    restore_slot: Any


class ReverseState(NamedTuple):
    """The state of the backward sweep.

    - `slot_pos`: int32[checkpoints], the step held by each slot, -1 for a free slot.
    - `cur`: int32, the step `k` of the current state `x_k`.
    - `end`: int32, the number of VJPs still to run; the next VJP is of step `end - 1`.
    - `target`: int32, the step whose state is stored when the advances reach it, or -1.
    """

    slot_pos: Any
    cur: Any
    end: Any
    target: Any


def _plan(slot_pos, cur, end, xp):
    """The next store target after restoring or storing `x_cur`; -1 for none."""
    length = (end - cur).astype(xp.int32)
    free = xp.sum(slot_pos < 0).astype(xp.int32)
    pred = (length >= 2) & (free >= 1)
    return cond(
        pred,
        lambda op: (op[0] + revolve_split(op[1], op[2], xp)).astype(xp.int32),
        lambda op: xp.int32(-1),
        (cur, length, free),
        xp,
    )


def _restore(slot_pos, end, xp):
    """Free the slots no longer needed once the VJPs of steps `>= end` ran, and pick the
    latest remaining stored state: returns `(slot_pos, restore_slot, cur)`."""
    slot_pos = xp.where(slot_pos >= end, -1, slot_pos).astype(xp.int32)
    latest = xp.max(slot_pos)
    restore_slot = xp.where((latest >= 0) & (end > 0), xp.argmax(slot_pos), -1)
    return slot_pos, restore_slot.astype(xp.int32), xp.maximum(latest, 0)


def reverse_init(
    slot_pos: Any, num_steps: Any, checkpoints: int, xp: Any
) -> tuple[Any, ReverseState]:
    """Start the backward sweep.

    **Arguments:**

    - `slot_pos`: int32[checkpoints], the step held by each slot after the forward sweep
        (-1 for an empty slot), as in `OnlineState.slot_pos`.
    - `num_steps`: int32, the trip count `n` of the forward sweep.
    - `checkpoints`: the number of slots, a Python int.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    A pair `(restore_slot, state)`: load the current state from slot `restore_slot`
    (`x_0` for -1), then call `reverse_step` until `reverse_done`.
    """
    slot_pos = xp.asarray(slot_pos, dtype=xp.int32).reshape((checkpoints,))
    end = xp.asarray(num_steps, dtype=xp.int32)
    # x_n itself is never needed: the VJPs run at x_0 .. x_{n-1}.
    slot_pos, restore_slot, cur = _restore(slot_pos, end, xp)
    target = _plan(slot_pos, cur, end, xp)
    return restore_slot, ReverseState(slot_pos, cur, end, target)


def reverse_step(state: ReverseState, xp: Any) -> tuple[ReverseAction, ReverseState]:
    """The next body evaluation of the backward sweep.

    **Arguments:**

    - `state`: the `ReverseState` from `reverse_init` or the previous call.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    A pair `(action, new_state)`; see `ReverseAction` for what the caller executes.
    """
    is_vjp = state.cur == state.end - 1
    store = state.cur + 1 == state.target
    action, state = cond(
        is_vjp, lambda st: _vjp(st, xp), lambda st: _advance(st, xp), state, xp
    )
    # After a VJP (and its restore) or a store, plan the next store: one `_plan` for
    # both, so the traced loop holds a single copy of `revolve_split`.
    target = cond(
        is_vjp | store,
        lambda st: _plan(st.slot_pos, st.cur, st.end, xp),
        lambda st: st.target,
        state,
        xp,
    )
    return action, state._replace(target=target)


def _vjp(state, xp):
    """Run the VJP of step `end - 1`, then restore the latest state still needed (the
    caller plans the next target)."""
    end = state.end - 1
    slot_pos, restore_slot, cur = _restore(state.slot_pos, end, xp)
    action = ReverseAction(
        is_vjp=xp.asarray(True),
        step=xp.asarray(state.cur, dtype=xp.int32),
        store_slot=xp.int32(-1),
        restore_slot=restore_slot,
    )
    return action, ReverseState(slot_pos, cur, end.astype(xp.int32), state.target)


def _advance(state, xp):
    """Advance `x_cur` to `x_{cur+1}`, storing it if it is the target."""
    return cond(
        state.cur + 1 == state.target,
        lambda st: _advance_store(st, xp),
        lambda st: _advance_only(st, xp),
        state,
        xp,
    )


def _advance_only(state, xp):
    """Advance `x_cur` to `x_{cur+1}` without storing it."""
    action = ReverseAction(
        is_vjp=xp.asarray(False),
        step=xp.asarray(state.cur, dtype=xp.int32),
        store_slot=xp.int32(-1),
        restore_slot=xp.int32(-1),
    )
    cur = (state.cur + 1).astype(xp.int32)
    return action, ReverseState(state.slot_pos, cur, state.end, state.target)


def _advance_store(state, xp):
    """Advance `x_cur` to `x_{cur+1}` and store it into the first free slot (the
    caller plans the next target)."""
    cur = (state.cur + 1).astype(xp.int32)
    store_slot = xp.argmax(state.slot_pos < 0).astype(xp.int32)
    slots = xp.arange(state.slot_pos.shape[0], dtype=xp.int32)
    slot_pos = xp.where(slots == store_slot, cur, state.slot_pos).astype(xp.int32)
    action = ReverseAction(
        is_vjp=xp.asarray(False),
        step=xp.asarray(state.cur, dtype=xp.int32),
        store_slot=store_slot,
        restore_slot=xp.int32(-1),
    )
    return action, ReverseState(slot_pos, cur, state.end, state.target)


def plain_advances(state: ReverseState, xp: Any = np) -> Any:
    """How many of the next `reverse_step` calls are plain advances (no store, no VJP):
    those up to the store target or, failing that, up to the next VJP. They change only
    `cur`, so callers may run them without calling `reverse_step` (the eager replay, and
    the compiled backward sweep, which runs them as a tight loop of body calls).

    **Arguments:**

    - `state`: a `ReverseState`.
    - `xp`: `numpy` (the default) or `jax.numpy`.

    **Returns:**

    An int32 scalar (a Python int for `numpy`).
    """
    cur, end, target = state.cur, state.end, state.target
    stop = xp.where(target <= cur, end - 1, xp.minimum(end - 1, target - 1))
    count = xp.maximum(stop - cur, 0).astype(xp.int32)
    return int(count) if xp is np else count


def reverse_done(state: ReverseState, xp: Any) -> Any:
    """Whether the backward sweep has run every VJP.

    **Arguments:**

    - `state`: a `ReverseState`.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    A bool scalar.
    """
    return xp.asarray(state.end <= 0)


class Segment(NamedTuple):
    """One stretch of the backward sweep, as `eager_reverse` yields it: `advances`
    plain advances from `x_start` (no store, no VJP), then `action` (an advance that
    may store, or a VJP and its restore), after which the current state is
    `x_cur`. The fields of `action` are NumPy scalars."""

    start: int
    advances: int
    action: ReverseAction
    cur: int


def eager_reverse(
    slot_pos: Any, num_steps: int, checkpoints: int
) -> tuple[int, int, Iterator[Segment]]:
    """Run the backward controller eagerly (NumPy): the one driver behind
    `loopax.schedule`'s replay and the trace-time tables of a loop of known length.

    Runs of plain advances are taken at once (`plain_advances`), every other action
    comes from `reverse_step`, exactly as the compiled backward sweep runs them.

    **Arguments:**

    - `slot_pos`: the step held by each slot after the forward sweep (-1: empty).
    - `num_steps`: the trip count `n`.
    - `checkpoints`: the number of slots.

    **Returns:**

    `(restore_slot, cur, segments)`: the slot of the first state to restore (-1:
    `x_0`), its step, and a lazy iterator of `Segment`s, the last one the VJP of
    step 0 (none for `n = 0`).
    """
    restore_slot, state = reverse_init(
        np.asarray(slot_pos, dtype=np.int32), np.int32(num_steps), checkpoints, np
    )

    def segments(state):
        while not reverse_done(state, np):
            start = int(state.cur)
            count = plain_advances(state)
            state = state._replace(cur=np.int32(start + count))
            action, state = reverse_step(state, np)
            yield Segment(start, count, action, int(state.cur))

    return int(restore_slot), int(state.cur), segments(state)
