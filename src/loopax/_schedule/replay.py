"""`loopax.schedule`: replay the checkpointing schedule of the compiled loop."""

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from . import picture
from .budget import carry_bytes
from .offline import revolve_forward_slots
from .online import forward_slots
from .reverse import plain_advances, reverse_done, reverse_init, reverse_step


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The body evaluations a checkpointed loop performs, in order, and what they cost.

    **Attributes:**

    - `num_steps`: the trip count `n` replayed (after clipping to `max_steps`).
    - `checkpoints`: the number of checkpoint slots.
    - `actions`: a tuple of `(kind, step, slot)` triples, in execution order. `kind` is
        one of `"forward"` (compute `x_{step+1}` from `x_step`, in the forward sweep and
        when recomputing in the backward sweep; `slot` is -1), `"save"` (store `x_step`
        into `slot`, right after the `"forward"` that produced it), `"restore"` (load
        `x_step` from `slot`, or the initial value `x_0` when `slot` is -1) and `"vjp"`
        (the VJP of step `step`, taken at `x_step`; `slot` is -1).
    - `num_forward`: body evaluations of the forward sweep, `n`.
    - `num_recomputed`: body evaluations spent recomputing states in the backward sweep.
    - `num_vjp`: VJPs of the body, `n`.
    - `total_evaluations`: `num_forward + num_recomputed + num_vjp`.
    - `peak_slots_used`: the largest number of slots holding a state at any time.
    - `stores_residuals`: True on the store-all path (`checkpoints >= max_steps`): like
        `lax.scan`, the forward sweep stores each step's VJP residuals (slot `k - 1`
        holds those of step `k - 1`), so a `"vjp"` runs only the linear part of the
        VJP and does not call the body again.
    - `known_length`: True if the forward sweep used revolve's placement for a trip
        count known up front (`loopax.scan`), False for the online rule.
    - `max_steps`: the loop's bound on the number of steps, or `None`.

    `str(schedule)` (or `schedule.render()`) gives a readable summary and, for short
    loops, the timeline; `schedule.plot()` draws it.
    """

    num_steps: int
    checkpoints: int
    actions: tuple[tuple[str, int, int], ...]
    num_forward: int
    num_recomputed: int
    num_vjp: int
    peak_slots_used: int
    stores_residuals: bool = False
    known_length: bool = False
    max_steps: int | None = None

    @property
    def total_evaluations(self) -> int:
        return self.num_forward + self.num_recomputed + self.num_vjp

    @property
    def recompute_factor(self) -> float:
        """Total body evaluations divided by `2 n`, the evaluations of a gradient that
        stores everything (`n` forward, `n` VJPs): 1.0 means nothing is recomputed,
        2.0 that the gradient evaluates the body twice as often. 1.0 for `n = 0`."""
        if self.num_steps == 0:
            return 1.0
        return self.total_evaluations / (2 * self.num_steps)

    def peak_memory(
        self, carry: Any, *, buffers: Callable[[Any], Any] | None = None
    ) -> int:
        """The bytes the checkpoints of this schedule take at their peak, for the
        example `carry`: `peak_slots_used` times the bytes of the carry's array leaves.

        **Arguments:**

        - `carry`: an example carry: a pytree of arrays, array-likes or
            `jax.ShapeDtypeStruct`s (only shapes and dtypes are read).
        - `buffers`: as for [`loopax.while_loop`][]: a function from the carry to its
            write-once arrays. Buffers are never stored in checkpoints, so they are
            excluded.

        **Returns:**

        An int, in bytes. It counts the stored carries only: not the buffers (kept
        once whatever the schedule), not the loop's 4-byte step counter per slot, not
        the body's own working memory. On the store-all path (`stores_residuals`)
        the slots hold each step's VJP residuals, which may be larger than the carry.
        """
        return self.peak_slots_used * carry_bytes(carry, buffers)

    def render(self, *, timeline: bool | None = None) -> str:
        """A readable summary: evaluations (forward / recomputed / VJP / total), the
        recompute factor and the peak slots used; then, if `timeline` (by default:
        when there are at most 240 actions), every action in order."""
        return picture.render(self, timeline=timeline)

    def __str__(self) -> str:
        return self.render()

    def plot(self, path: Any = None, *, ax: Any = None) -> Any:
        """Draw the schedule: the classic checkpointing picture.

        Time (body evaluations, in order) runs left to right and the step `k` of the
        current state `x_k` bottom to top. The forward sweep climbs from `x_0` to
        `x_n`; the backward sweep alternates recomputations (climbing again from a
        restored checkpoint) and VJPs (one step down each). Grey bars show how long
        each checkpoint is held, dots its save, dotted lines and triangles the
        restores. Needs matplotlib (`pip install 'loopax[plot]'`), imported only
        here.

        **Arguments:**

        - `path`: if given, the figure is also saved there (any format matplotlib
            knows from the suffix, e.g. `"schedule.png"`, `"schedule.svg"`).
        - `ax`: a matplotlib `Axes` to draw into; by default a new figure.

        **Returns:**

        The `matplotlib.figure.Figure`.
        """
        return picture.plot(self, path, ax=ax)

    @property
    def body_calls(self) -> tuple[int, ...]:
        """The step index of every call of the body function, in order: what a
        `jax.debug.callback` in the body records during one gradient."""
        kinds = ("forward",) if self.stores_residuals else ("forward", "vjp")
        return tuple(step for kind, step, _ in self.actions if kind in kinds)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        if minimum == 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value}.")
        raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    return int(value)


def schedule(
    num_steps: int,
    checkpoints: int,
    *,
    max_steps: int | None = None,
    known_length: bool = False,
) -> Schedule:
    """Replay the checkpointing schedule of a checkpointed loop of `num_steps` steps.

    Runs the very same online (forward sweep) and backward-sweep controllers as the
    compiled loop, eagerly with NumPy, and records every body evaluation. (The forward
    decisions are cached per `checkpoints` and priced in batches, and runs of plain
    advances in the backward sweep are emitted at once; see `forward_slots` and
    `plain_advances`.) Use it to see
    what reverse mode through `loopax.while_loop(..., kind="checkpointed",
    checkpoints=...)` will cost.

    **Arguments:**

    - `num_steps`: the trip count of the loop, a non-negative int. Clipped to
        `max_steps`.
    - `checkpoints`: the number of checkpoint slots (states kept besides the initial
        value), a positive int.
    - `max_steps`: the loop's bound on the number of steps, a non-negative int, or
        `None` (the default) for no bound. When `checkpoints >= max_steps`, every state
        is stored and nothing is recomputed.
    - `known_length`: if True, replay a loop whose trip count is known before it
        starts (`loopax.scan`, `loopax.fori_loop` with static bounds): its forward
        sweep stores states where revolve's first sweep would
        (`revolve_forward_slots`), so the whole gradient recomputes the offline optimum
        $t(n + 1, c + 1) - n$ states. Default False: the online rule of
        `loopax.while_loop`.

    **Returns:**

    A `loopax.Schedule`.
    """
    num_steps = _check_int("num_steps", num_steps, 0)
    checkpoints = _check_int("checkpoints", checkpoints, 1)
    if max_steps is not None:
        max_steps = _check_int("max_steps", max_steps, 0)
        num_steps = min(num_steps, max_steps)
    if not isinstance(known_length, bool):
        raise TypeError(f"`known_length` must be a bool, got {known_length!r}.")
    store_all = max_steps is not None and checkpoints >= max_steps

    actions: list[tuple[str, int, int]] = []
    used = peak = 0
    # Forward sweep.
    if store_all:
        slots = tuple(range(num_steps))
    elif known_length:
        slots = revolve_forward_slots(num_steps, checkpoints).tolist()
    else:
        slots = forward_slots(checkpoints, num_steps)
    slot_pos = np.full((checkpoints,), -1, dtype=np.int32)
    for k, slot in enumerate(slots, start=1):
        actions.append(("forward", k - 1, -1))
        if slot >= 0:
            actions.append(("save", k, slot))
            used += slot_pos[slot] < 0
            peak = max(peak, used)
            slot_pos[slot] = k
    # Backward sweep.
    restore_slot, rstate = reverse_init(slot_pos, np.int32(num_steps), checkpoints, np)
    num_recomputed = 0
    if num_steps > 0:
        actions.append(("restore", int(rstate.cur), int(restore_slot)))
    while not reverse_done(rstate, np):
        skip = plain_advances(rstate)
        if skip:
            cur = int(rstate.cur)
            actions.extend(("forward", k, -1) for k in range(cur, cur + skip))
            num_recomputed += skip
            rstate = rstate._replace(cur=np.int32(cur + skip))
        action, rstate = reverse_step(rstate, np)
        step = int(action.step)
        if action.is_vjp:
            actions.append(("vjp", step, -1))
            if step > 0:
                actions.append(("restore", int(rstate.cur), int(action.restore_slot)))
        else:
            num_recomputed += 1
            actions.append(("forward", step, -1))
            if action.store_slot >= 0:
                actions.append(("save", step + 1, int(action.store_slot)))
                peak = max(peak, int(np.sum(rstate.slot_pos >= 0)))
    return Schedule(
        num_steps=num_steps,
        checkpoints=checkpoints,
        actions=tuple(actions),
        num_forward=num_steps,
        num_recomputed=num_recomputed,
        num_vjp=num_steps,
        peak_slots_used=peak,
        stores_residuals=store_all,
        known_length=known_length,
        max_steps=max_steps,
    )
