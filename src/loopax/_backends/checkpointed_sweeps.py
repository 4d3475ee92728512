"""The sweeps of the checkpointed kind, on flat lists of arrays.

The primitives (`checkpointed_loop.py`, `checkpointed_linear.py`) decide *what* runs; this module is
*how*: the forward sweeps that record what the backward sweeps need, and the
backward sweeps themselves. Everything here is written against small callables
(`step`, `keep_going`, `advance`, `transpose_step`), never against jaxprs.

The backward sweeps build their loops with `while_loop`, which the primitive module
injects (it binds the checkpointed loop primitive), so that a backward sweep can
itself be differentiated in reverse with bounded memory.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._jax_internals import zeros
from .._schedule import (
    eager_reverse,
    plain_advances,
    reverse_init,
    reverse_step,
)
from .._schedule.counts import online_table
from .._schedule.offline import INT32_MAX
from .._schedule.online import (
    OnlinePlan,
    next_store,
    online_plan,
    online_store,
    online_table_length,
)


Leaves = list[Array]
WhileLoop = Callable[[Callable, Callable, Any], Any]


def pick(leaves: Sequence[Any], mask: Sequence[bool], want: bool = True) -> list:
    """The entries of `leaves` where `mask` equals `want`."""
    return [x for x, m in zip(leaves, mask, strict=True) if m == want]


def merge(mask: Sequence[bool], when_true: Sequence[Any], when_false: Sequence[Any]):
    """The inverse of `pick`: interleave two lists back into `mask`'s order."""
    true, false = iter(when_true), iter(when_false)
    out = [next(true) if m else next(false) for m in mask]
    if next(true, None) is not None or next(false, None) is not None:
        raise AssertionError(
            "loopax internal error: merge lengths; please report a bug."
        )
    return out


def _write_slot(stack: Leaves, slot, leaves: Leaves) -> Leaves:
    return [s.at[slot].set(x) for s, x in zip(stack, leaves, strict=True)]


def _read_slot(stack: Leaves, slot) -> Leaves:
    return [s[slot] for s in stack]


def output_rows(max_steps: int | None) -> int:
    """The rows of a per-step output's stack: `max_steps`, which a loop with
    per-step outputs always has (`loopax.scan` sets it)."""
    if max_steps is None:
        raise AssertionError(
            "loopax internal error: per-step outputs need max_steps; please report a bug."
        )
    return max_steps


# -- forward sweeps -------------------------------------------------------------------


def _slot_dtype(checkpoints: int):
    """The smallest integer type holding slots -1 .. checkpoints - 1 (a smaller
    constant in the compiled program)."""
    return (
        np.int8 if checkpoints < 2**7 else np.int16 if checkpoints < 2**15 else np.int32
    )


def plain_forward(step: Callable, keep_going: Callable, init: Leaves) -> Leaves:
    """The undifferentiated loop: exactly a `lax.while_loop`."""
    return lax.while_loop(keep_going, lambda c: step(c)[0], list(init))


def recording_forward(
    step: Callable,
    keep_going: Callable,
    init: Leaves,
    is_stored: Sequence[bool],
    checkpoints: int,
    forward_slots: Sequence[int] | None,
    max_steps: int | None,
    ys_shapes: Sequence[Any] = (),
) -> tuple[Leaves, Leaves, Array, Leaves]:
    """The loop, also storing states in `checkpoints` slots.

    After each step the online rule (or the precomputed `forward_slots` table, for a
    loop of known length) says whether to store the new state and into which slot.
    Only the leaves marked `is_stored` (everything but buffers) are stored.

    The rule's decisions depend only on `checkpoints` and the step, so the first ones
    (all of them for a loop of known length) are looked up in a table computed at
    trace time, and the steps between two stores run as a tight inner loop of body
    calls, as in `plain_forward`; the outer loop runs once per store (the store is
    a `lax.cond`). Past the table each outer iteration also runs the rule itself, to
    find the next store. (Keeping the per-step loop body small matters on XLA:CPU: see
    `checkpointed_backward`.)

    Each step's extra outputs (`ys_shapes`, if any) are written to row `k` of arrays
    of `max_steps` rows, as in `per_step_forward`.

    Returns the final state, the stack (one array per stored leaf), `slot_pos`, the
    step of the state held by each slot (-1: free), and the stacked extra outputs.
    """
    exact = forward_slots is not None
    if not exact:
        forward_slots = online_table(
            checkpoints, online_table_length(max_steps, checkpoints)
        )
    num_table = len(forward_slots)
    table_covers_loop = exact or (max_steps is not None and max_steps <= num_table)
    # Store `m` of the table: after step `store_steps[m]`, into `store_slots[m]`. Past
    # the table a last entry stops the tight loop at the table's end, with no store,
    # and the rule takes over from there.
    stores = [(k, slot) for k, slot in enumerate(forward_slots, start=1) if slot >= 0]
    if not table_covers_loop:
        stores.append((num_table, -1))
    # One spare entry, read only when the table covers the loop: a stop never reached.
    store_steps = jnp.asarray(
        np.array([k for k, _ in stores] + [INT32_MAX], dtype=np.int32)
    )
    store_slots = jnp.asarray(
        np.array([slot for _, slot in stores] + [-1], dtype=_slot_dtype(checkpoints))
    )
    num_stores = len(stores)
    # The rule's state at the table's end, computed at trace time.
    table_pos = np.full((checkpoints,), -1, dtype=np.int32)
    for k, slot in stores:
        if slot >= 0:
            table_pos[slot] = k
    table_plan = _plan_at(table_pos)

    stack = [zeros(jax.typeof(x), (checkpoints,)) for x in pick(init, is_stored)]
    ys = [zeros(y, (output_rows(max_steps),)) for y in ys_shapes]

    def step_and_write(carry):
        state, ys = carry
        k = state[0]  # The step counter.
        state, y = step(state)
        return state, _write_slot(ys, k, y)

    def rule(slot_pos, plan, k, slot):
        """Past the table: record the store of `x_k` into `slot` (-1: none), then
        find the next stop: one plan per store (`online_plan`), $O(1)$ per step
        searched."""

        def stored():
            pos = slot_pos.at[slot].set(k)

            def order():
                return lax.cond(
                    k > checkpoints,
                    lambda: online_store(slot_pos, plan, slot, k, jnp)[1],
                    lambda: jnp.arange(checkpoints, dtype=jnp.int32),
                )

            new_plan = lax.cond(
                k >= checkpoints,
                lambda: online_plan(pos, order(), jnp),
                lambda: plan,
            )
            return pos, new_plan

        slot_pos, plan = lax.cond(slot >= 0, stored, lambda: (slot_pos, plan))
        stop, next_slot = lax.cond(
            k < checkpoints,
            lambda: (k + 1, k),
            lambda: next_store(plan, k, _ONLINE_WINDOW, jnp),
        )
        return slot_pos, plan, stop, next_slot

    def run_to_next_store(carry):
        state, stack, slot_pos, plan, ys, m = carry
        stop, slot = m[1], m[2]
        state, ys = lax.while_loop(
            lambda c: keep_going(c[0]) & (c[0][0] < stop),
            step_and_write,
            (state, ys),
        )
        k = state[0]
        reached = k == stop
        slot = jnp.where(reached, slot, -1)
        stack = lax.cond(
            slot >= 0,
            lambda: _write_slot(stack, slot, pick(state, is_stored)),
            lambda: stack,
        )
        index = m[0] + 1

        def from_table():
            pos = lax.cond(
                slot >= 0, lambda: slot_pos.at[slot].set(k), lambda: slot_pos
            )
            return (
                pos,
                plan,
                store_steps[index],
                store_slots[index].astype(jnp.int32),
            )

        if table_covers_loop:
            new = from_table()
        else:
            new = lax.cond(
                index < num_stores,
                from_table,
                lambda: rule(slot_pos, plan, k, slot),
            )
        # Not reached: the loop has ended and nothing was stored.
        slot_pos, plan, next_stop, next_slot = new
        m = jnp.stack([index, next_stop, next_slot])
        return state, stack, slot_pos, plan, ys, m

    m = jnp.stack([jnp.int32(0), store_steps[0], store_slots[0].astype(jnp.int32)])
    final, stack, slot_pos, _, ys, _ = lax.while_loop(
        lambda c: keep_going(c[0]),
        run_to_next_store,
        (
            list(init),
            stack,
            jnp.full((checkpoints,), -1, dtype=jnp.int32),
            table_plan,
            ys,
            m,
        ),
    )
    return final, stack, slot_pos, ys


# Steps the compiled forward sweep searches at once for the next store past the table.
_ONLINE_WINDOW = 32


def _plan_at(slot_pos: np.ndarray) -> OnlinePlan:
    """The rule's plan for slots holding `slot_pos` (any plan while a slot is empty:
    it is not read until the slots are full), as int32 constants."""
    order = np.argsort(slot_pos, kind="stable").astype(np.int32)
    if np.all(slot_pos >= 0):
        plan = online_plan(slot_pos, order, np)
    else:
        zero = np.int32(0)
        plan = OnlinePlan(order, zero, zero, zero, zero, zero, zero, zero)
    return OnlinePlan(*(jnp.asarray(np.asarray(x, dtype=np.int32)) for x in plan))


def per_step_forward(
    step: Callable, keep_going: Callable, init: Leaves, ys_shapes, max_steps: int
) -> tuple[Leaves, Leaves]:
    """The loop, also writing each step's extra outputs `ys` to row `k` of an array of
    `max_steps` rows (like `lax.scan`'s stacked outputs). Rows past the last step are
    zero."""
    stacks = [zeros(y, (max_steps,)) for y in ys_shapes]

    def forward_step(carry):
        state, stacks = carry
        k = state[0]
        state, ys = step(state)
        return state, _write_slot(stacks, k, ys)

    final, stacks = lax.while_loop(
        lambda c: keep_going(c[0]), forward_step, (list(init), stacks)
    )
    return final, stacks


# -- backward sweeps ------------------------------------------------------------------


class _OnlineController:
    """The reverse controller (`_schedule/reverse.py`) run inside the compiled sweep:
    it plans from the recorded `slot_pos` and the trip count, known only at run time.

    Its state between segments is `(reverse state, whether the last segment ended at
    the VJP, the slot to restore after that VJP)`.
    """

    def __init__(self, checkpoints: int):
        self.checkpoints = checkpoints

    def init(self, slot_pos, num_steps):
        restore_slot, state = reverse_init(slot_pos, num_steps, self.checkpoints, jnp)
        return restore_slot, (state, jnp.array(False), jnp.int32(-1))

    def start_vjp(self, control, vjp_index):
        del vjp_index
        state, _, restore_slot = control
        return state, jnp.array(False), restore_slot

    def segment(self, control):
        state = control[0]
        count = plain_advances(state, jnp)
        state = state._replace(cur=state.cur + count)
        action, state = reverse_step(state, jnp)
        runs = count + jnp.logical_not(action.is_vjp).astype(jnp.int32)
        store_slot = action.store_slot
        control = (state, action.is_vjp, action.restore_slot)
        return runs, store_slot >= 0, lambda: store_slot, control

    def more_segments(self, control):
        return jnp.logical_not(control[1])

    def restore_slot(self, control, vjp_index):
        del vjp_index
        return control[2]


class _TableController:
    """The same controller for a loop whose trip count and forward placement are known
    up front (`loopax.scan`): every decision is computed at trace time (with the very
    same code, in NumPy) and the sweep only looks them up. For small bodies the
    controller's scalar arithmetic otherwise costs more than the body.

    A segment is one table row: `runs` advances, then a store into `store_slot` (-1:
    none). VJP `j` (of step `n - 1 - j`) follows the segments up to row
    `last_row[j]`, then restores from `restore_after[j]`. Its state between segments
    is `(next row, last row of the current VJP)`."""

    def __init__(self, checkpoints: int, forward_slots: Sequence[int]):
        slot_pos = np.full((checkpoints,), -1, dtype=np.int32)
        for k, slot in enumerate(forward_slots, start=1):
            if slot >= 0:
                slot_pos[slot] = k
        self.first_restore, _, segments = eager_reverse(
            slot_pos, len(forward_slots), checkpoints
        )
        runs, store_slot, last_row, restore_after = [], [], [], []
        for segment in segments:
            action = segment.action
            runs.append(segment.advances + (not action.is_vjp))
            store_slot.append(int(action.store_slot))
            if action.is_vjp:
                last_row.append(len(runs) - 1)
                restore_after.append(int(action.restore_slot))

        def table(values):
            # One spare entry: never read, keeps the lookups in range for n = 0.
            return jnp.asarray(np.array([*values, 0], dtype=np.int32))

        self.runs, self.store_slot = table(runs), table(store_slot)
        self.last_row, self.restore_after = table(last_row), table(restore_after)

    def init(self, slot_pos, num_steps):
        del slot_pos, num_steps
        return jnp.int32(self.first_restore), (jnp.int32(0), jnp.int32(0))

    def start_vjp(self, control, vjp_index):
        return control[0], self.last_row[vjp_index]

    def segment(self, control):
        row, last = control
        # The slot is looked up inside the store's branch: one operation fewer in the
        # segment loop's body (see `checkpointed_backward`).
        store = self.store_slot[row] >= 0
        return self.runs[row], store, lambda: self.store_slot[row], (row + 1, last)

    def more_segments(self, control):
        row, last = control
        return row <= last

    def restore_slot(self, control, vjp_index):
        del control
        return self.restore_after[vjp_index]


def checkpointed_backward(
    *,
    while_loop: WhileLoop,
    advance: Callable[[Leaves], Leaves],
    transpose_step: Callable[[Leaves, Leaves, Any], tuple[Leaves, Leaves]],
    is_stored: Sequence[bool],
    init: Leaves,
    final: Leaves,
    stack: Leaves,
    slot_pos: Array,
    checkpoints: int,
    ct_final: Leaves,
    ct_consts: Leaves,
    stack_injection: Callable[[Any, Leaves], Leaves] | None = None,
    forward_slots: Sequence[int] | None = None,
) -> tuple[Leaves, Leaves]:
    """Revolve reversal from the recorded checkpoints.

    - `advance(state) -> state`: one plain step of the (known, primal) loop.
    - `transpose_step(state, ct, k) -> (ct_before, ct_consts)`: the transposed linear
      step at `state`, the state `x_k` (the VJP of step `k`).
    - `init`, `final`: the loop's first and last (known) states; `stack`, `slot_pos`:
      what `recording_forward` stored.
    - `stack_injection(k, ct) -> ct`: adds the cotangent of the state `x_k` coming
      from the recorded stack itself (when the stack is an output being
      differentiated); `None` when it is not.
    - `forward_slots`: for a loop of known length, the forward placement table; the
      whole reverse schedule is then computed at trace time.

    The reverse controller (`_schedule/reverse.py`) emits the VJPs of steps
    `n - 1, ..., 0` in order; before each, some *segments*: a run of advances, then
    possibly a store. One `while_loop` iteration per VJP runs its segments (an inner
    loop, whose body is an advance loop and a store), the VJP, and restores the next
    state from a slot. The sweep carries only the stored (non-buffer) leaves: every
    step reads the *final* buffers, which by the buffer contract hold every value any
    step reads.

    Returns the cotangents of the initial state and of the constants.
    """
    init_stored = pick(init, is_stored)
    num_steps = final[0]
    controller = (
        _OnlineController(checkpoints)
        if forward_slots is None
        else _TableController(checkpoints, forward_slots)
    )

    def restore(stack, slot):
        """The stored leaves of the state in `slot` (-1: the initial state)."""
        return lax.cond(slot < 0, lambda: init_stored, lambda: _read_slot(stack, slot))

    def full_state(stored):
        return merge(is_stored, stored, pick(final, is_stored, False))

    def advance_stored(stored):
        return pick(advance(full_state(stored)), is_stored)

    def segment(carry):
        """`runs` advances (a tight count-down loop), then a store if asked for. The
        controller depends on step indices only, never on the states, so what to do
        is known before advancing."""
        stack, stored, control = carry
        runs, store, store_slot, control = controller.segment(control)
        _, stored = while_loop(
            lambda c: c[0] > 0,
            lambda c: (c[0] - 1, advance_stored(c[1])),
            (runs, stored),
        )
        stack = lax.cond(
            store, lambda: _write_slot(stack, store_slot(), stored), lambda: stack
        )
        return stack, stored, control

    def reverse_iteration(carry):
        """VJP `j`, of step `n - 1 - j`, with the segments before it.

        No stack- or buffer-sized value passes through a `lax.cond` with two live
        branches: XLA copies such operands, which would cost a copy of the stack (or
        of a buffer's cotangent) per iteration. Every advance runs through one tight
        loop, so the body appears twice in the compiled backward sweep whatever
        `checkpoints` is: once to advance, once in the VJP.

        The segment loop's body is kept to a few operations: XLA:CPU runs a loop body
        of more than eight operations (unless all its arrays are at most 512 bytes, or
        its operations form a chain) as a task graph on its thread pool, which costs
        ~0.6 us per iteration on two cores, more than a small body's whole step (see
        docs/design.md, "Thunk counts")."""
        j, stored, stack, ct_state, ct_consts, control = carry
        stack, stored, control = while_loop(
            lambda c: controller.more_segments(c[2]),
            segment,
            (stack, stored, controller.start_vjp(control, j)),
        )
        step = num_steps - 1 - j
        if stack_injection is not None:
            ct_state = stack_injection(step + 1, ct_state)
        ct_state, ct_step_consts = transpose_step(full_state(stored), ct_state, step)
        ct_consts = [a + b for a, b in zip(ct_consts, ct_step_consts, strict=True)]
        stored = restore(stack, controller.restore_slot(control, j))
        return j + 1, stored, stack, ct_state, ct_consts, control

    restore_slot, control = controller.init(slot_pos, num_steps)
    carry = (
        jnp.int32(0),
        restore(stack, restore_slot),
        stack,
        ct_final,
        ct_consts,
        control,
    )
    _, _, _, ct_init, ct_consts, _ = while_loop(
        lambda c: c[0] < num_steps, reverse_iteration, carry
    )
    return ct_init, ct_consts


def per_step_backward(
    *,
    while_loop: WhileLoop,
    transpose_step: Callable[[Any, Leaves], tuple[Leaves, Leaves]],
    num_steps: Array,
    ct_final: Leaves,
    ct_consts: Leaves,
) -> tuple[Leaves, Leaves]:
    """The reversed loop over recorded per-step residuals: no recomputation.

    `transpose_step(k, ct) -> (ct_before, ct_consts)` transposes step `k` from its
    stored residuals."""

    def reverse_iteration(carry):
        k, ct_state, ct_consts = carry
        ct_state, ct_step_consts = transpose_step(k, ct_state)
        ct_consts = [a + b for a, b in zip(ct_consts, ct_step_consts, strict=True)]
        return k - 1, ct_state, ct_consts

    _, ct_init, ct_consts = while_loop(
        lambda c: c[0] >= 0,
        reverse_iteration,
        (jnp.asarray(num_steps - 1, jnp.int32), ct_final, ct_consts),
    )
    return ct_init, ct_consts
