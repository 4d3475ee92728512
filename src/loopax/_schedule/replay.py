"""`loopax.schedule`: replay the checkpointing schedule of the compiled loop."""

import dataclasses
import functools as ft
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import picture
from .counts import schedule_counts
from .offline import revolve_forward_slots
from .online import forward_slots
from .reverse import eager_reverse


Action = tuple[str, int, int]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The body evaluations a checkpointed loop performs, in order, and what they cost.

    The counts are computed in closed form (see `counts.py`); the actions themselves
    are replayed only when asked for (`actions`, `iter_actions`, `body_calls`, a
    timeline, a plot), by running the very same controllers as the compiled loop.

    **Attributes:**

    - `num_steps`: the trip count `n` replayed (after clipping to `max_steps`).
    - `checkpoints`: the number of checkpoint slots.
    - `num_forward`: body evaluations of the forward sweep, `n`.
    - `num_recomputed`: body evaluations spent recomputing states in the backward sweep.
    - `num_vjp`: VJPs of the body, `n`.
    - `total_evaluations`: `num_forward + num_recomputed + num_vjp`: body
        evaluations plus VJPs, each VJP counted as one evaluation (it costs about one
        body evaluation and its transpose). On the store-all path
        (`stores_residuals`) a VJP does not call the body again, so the body runs
        `num_forward + num_recomputed` times, not `total_evaluations`.
    - `peak_slots_used`: the largest number of slots holding a state at any time.
    - `stores_residuals`: True on the store-all path (`checkpoints >= max_steps`): like
        `lax.scan`, the forward sweep stores each step's VJP residuals (slot `k - 1`
        holds those of step `k - 1`), so a `"vjp"` runs only the linear part of the
        VJP and does not call the body again.
    - `known_length`: True if the forward sweep used revolve's placement for a trip
        count known up front (`loopax.scan`), False for the online rule.
    - `max_steps`: the loop's bound on the number of steps, or `None`.
    - `actions` (computed on first access, then kept): a tuple of `(kind, step, slot)`
        triples, in execution order. `kind` is one of `"forward"` (compute
        `x_{step+1}` from `x_step`, in the forward sweep and when recomputing in the
        backward sweep; `slot` is -1), `"save"` (store `x_step` into `slot`, right
        after the `"forward"` that produced it), `"restore"` (load `x_step` from
        `slot`, or the initial value `x_0` when `slot` is -1) and `"vjp"` (the VJP of
        step `step`, taken at `x_step`; `slot` is -1). There are more than
        `total_evaluations` of them: for long loops prefer `iter_actions()`.

    `str(schedule)` (or `schedule.render()`) gives a readable summary and, for short
    loops, the timeline; `schedule.plot()` draws it.
    """

    num_steps: int
    checkpoints: int
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

    def peak_bytes(self, checkpoint_bytes: int) -> int:
        """`peak_slots_used` times `checkpoint_bytes`, the bytes of one checkpoint."""
        return self.peak_slots_used * checkpoint_bytes

    def iter_actions(self) -> Iterator[Action]:
        """The actions (see `actions`) one at a time, generated as they are needed:
        memory O(checkpoints) for the online rule, whatever the number of steps."""
        return _replay(
            self.num_steps, self.checkpoints, self.stores_residuals, self.known_length
        )

    @ft.cached_property
    def actions(self) -> tuple[Action, ...]:
        return tuple(self.iter_actions())

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
        return tuple(step for kind, step, _ in self.iter_actions() if kind in kinds)


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
    """The checkpointing schedule of a checkpointed loop of `num_steps` steps.

    Use it to see what reverse mode through `loopax.while_loop(...,
    kind="checkpointed", checkpoints=...)` will cost before paying for it. The counts
    (recomputations, peak slots, recompute factor) are computed without enumerating
    the steps: the backward sweep's cost is a sum of closed forms over the stretches
    between the states the forward sweep leaves in the slots, and those are found by
    jumping from one store to the next (see `counts.py`). Memory is O(`checkpoints`);
    time is O(`checkpoints`) for `known_length` and, for the online rule, grows with
    the number of times it stores (measured in `benchmarks/RESULTS.md`). The actions
    themselves are replayed from the very same controllers as the compiled loop, only
    when asked for (`Schedule.actions`, `iter_actions`, a timeline or a plot).

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
    counts = schedule_counts(
        num_steps, checkpoints, known_length=known_length, store_all=store_all
    )
    return Schedule(
        num_steps=num_steps,
        checkpoints=checkpoints,
        num_forward=num_steps,
        num_recomputed=counts.num_recomputed,
        num_vjp=num_steps,
        peak_slots_used=counts.peak_slots_used,
        stores_residuals=store_all,
        known_length=known_length,
        max_steps=max_steps,
    )


def _forward_slots(
    num_steps: int, checkpoints: int, store_all: bool, known_length: bool
) -> Iterator[int]:
    """The slot the forward sweep stores each `x_k` into (or -1), `k = 1 .. n`."""
    if store_all:
        return iter(range(num_steps))
    if known_length:
        return iter(revolve_forward_slots(num_steps, checkpoints).tolist())
    return iter(forward_slots(checkpoints, num_steps))


def _replay(
    num_steps: int, checkpoints: int, store_all: bool, known_length: bool
) -> Iterator[Action]:
    """Every action of both sweeps, in order: the forward rule's decisions and the
    backward controller (`eager_reverse`), exactly as the compiled loop runs them."""
    slot_pos = np.full((checkpoints,), -1, dtype=np.int32)
    slots = _forward_slots(num_steps, checkpoints, store_all, known_length)
    for k, slot in enumerate(slots, start=1):
        yield ("forward", k - 1, -1)
        if slot >= 0:
            yield ("save", k, slot)
            slot_pos[slot] = k
    restore_slot, cur, segments = eager_reverse(slot_pos, num_steps, checkpoints)
    if num_steps > 0:
        yield ("restore", cur, restore_slot)
    for segment in segments:
        yield from (
            ("forward", k, -1)
            for k in range(segment.start, segment.start + segment.advances)
        )
        action = segment.action
        step = int(action.step)
        if action.is_vjp:
            yield ("vjp", step, -1)
            if step > 0:
                yield ("restore", segment.cur, int(action.restore_slot))
        else:
            yield ("forward", step, -1)
            if action.store_slot >= 0:
                yield ("save", step + 1, int(action.store_slot))


def replay_counts(schedule: Schedule) -> tuple[int, int]:
    """`(num_recomputed, peak_slots_used)` counted on the replayed actions: the
    reference the closed forms of `counts.py` are tested against."""
    used: set[int] = set()
    live: dict[int, int] = {}
    forwards = peak = 0
    backward = False
    for kind, step, slot in schedule.iter_actions():
        if kind == "forward":
            forwards += 1
        elif kind == "save":
            used.add(slot)
            live[slot] = step
            peak = max(peak, len(live) if backward else len(used))
        elif kind == "restore" and not backward:
            backward = True
            live = {s: k for s, k in live.items() if k < schedule.num_steps}
        elif kind == "vjp":
            live = {s: k for s, k in live.items() if k < step}
    return forwards - schedule.num_steps, peak
