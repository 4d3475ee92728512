"""What a schedule costs, without enumerating it.

`loopax.schedule(n, c)` used to replay every step of both sweeps; for a million steps
that took longer than the gradient it described. The counts need much less:

- the backward sweep reverses each stretch between the states left in the slots
  optimally, the `i`-th stretch from the start with `c - i` free slots, so it
  recomputes the sum of Griewank and Walther's closed form `revolve_cost` over the
  stretches, and its peak occupancy has a closed form too (`peak_slots_used`);
- so only the *final slot positions* of the forward sweep are needed. For a loop of
  known length they are revolve's first sweep, `c` splits (`revolve_positions`). For
  the online rule they are found by jumping from one store to the next
  (`online_positions`): between stores the rule's options change in two terms
  only, whose difference is convex, so the next store is found by bisection.

Everything here is checked against the exact replay (`replay.py`, which runs the real
rules step by step) over a grid of `(n, c)` in the tests: if the online rule changes,
`online_positions` must change with it.

References: Griewank & Walther (2000), *Algorithm 799: Revolve* (full entries:
docs/how-it-works.md, References).
"""

import functools as ft
import itertools
import math
import operator
from typing import NamedTuple

import numpy as np

from .offline import (
    INT32_MAX,
    _repetition_number,
    beta,
    revolve_cost,
    revolve_cost_capped,
    revolve_split_int,
)


class Counts(NamedTuple):
    """The cost of one gradient: `num_recomputed` body evaluations besides the `n`
    forward and `n` VJPs, and at most `peak_slots_used` slots in use at once."""

    num_recomputed: int
    peak_slots_used: int


def schedule_counts(
    num_steps: int, checkpoints: int, *, known_length: bool, store_all: bool
) -> Counts:
    """The counts `loopax.schedule` reports, in closed form given the forward sweep's
    final slot positions: O(c) revolve costs, plus finding the positions."""
    if store_all:
        return Counts(0, num_steps)
    if known_length:
        return _known_length_counts(num_steps, checkpoints)
    else:
        points = online_positions(num_steps, checkpoints)
        forward_peak = min(num_steps, checkpoints)
    # The slot holding x_n (if any) is freed before the first VJP.
    bounds = [0, *(p for p in points if p < num_steps), num_steps]
    recomputed = 0
    peak = forward_peak
    for i in range(len(bounds) - 1):
        length = bounds[i + 1] - bounds[i]
        free = checkpoints - i
        recomputed += revolve_cost(length, free)
        # While stretch i is reversed, b_1 .. b_i hold slots; revolve's reversal
        # of `length` steps with `free` slots holds min(free, length - 1) at its
        # peak: the chain of tails stores one state per level until it runs out of
        # slots or steps (each tail is longer than the slots left; see
        # `revolve_split`).
        if free > 0 and length >= 2:
            peak = max(peak, i + min(free, length - 1))
    return Counts(recomputed, peak)


def _known_length_counts(num_steps: int, checkpoints: int) -> Counts:
    """Revolve's placement: `t(n + 1, c + 1) - n` recomputations (Griewank and
    Walther's closed form; see `revolve_forward_slots`), and the peak from the
    stretches, splitting only until some stretch fills every slot."""
    if num_steps == 0:
        return Counts(0, 0)
    recomputed = revolve_cost(num_steps + 1, checkpoints) - num_steps
    peak = start = stored = 0
    while stored < checkpoints and peak < checkpoints:
        split = revolve_split_int(num_steps + 1 - start, checkpoints - stored)
        end = min(start + split, num_steps)
        # Stretch [start, end) is reversed with `checkpoints - stored` free slots.
        peak = max(peak, stored + min(checkpoints - stored, end - start - 1))
        if start + split >= num_steps:
            return Counts(recomputed, max(peak, stored))
        start = end
        stored += 1
        peak = max(peak, stored)
    return Counts(recomputed, checkpoints if peak >= checkpoints else peak)


def revolve_positions(num_steps: int, checkpoints: int) -> tuple[int, ...]:
    """The states the forward sweep of a loop of known length stores
    (`revolve_forward_slots`), as sorted steps: at most `checkpoints` splits."""
    points = []
    start = 0
    while len(points) < checkpoints and num_steps - start >= 1:
        start += revolve_split_int(num_steps + 1 - start, checkpoints - len(points))
        if start >= num_steps:
            break
        points.append(start)
    return tuple(points)


# -- the online rule, fast-forwarded ----------------------------------------------------

# Per `checkpoints`: `(steps searched, positions b_0 = 0, b_1 .. b_c, frozen)`, so that
# a longer loop resumes where a shorter one stopped. O(c) each, a few kept.
_ONLINE: dict[int, tuple[int, list[int], bool]] = {}
_ONLINE_CACHE_SIZE = 16


def online_positions(num_steps: int, checkpoints: int) -> tuple[int, ...]:
    """The steps whose states the online rule (`online.py`) holds after `num_steps`
    steps with `checkpoints` slots, sorted.

    The rule fills the slots with `x_1 .. x_c`. Then, after each step `k`, it prices
    keeping the slots against replacing the state at each sorted position `b_i` by
    `x_k` and stores when some replacement is strictly cheaper. Between two stores
    the positions are fixed, and with `L = k - b_c` only these terms depend on `k`:
    keeping pays `Q(L + 1)` for the last stretch (no free slot), replacing `b_i`,
    `i < c`, pays `T(L)` (one free slot) and replacing `b_c` pays `T(L + b_c -
    b_{c-1})`, where `Q` and `T` are the revolve costs with 0 and 1 free slots capped
    as the rule caps them. So the rule stores at the first `L` where `f(L) = const +
    Q(L + 1) - T(L + d) > 0` for one of two constants and offsets `d`. While `Q` is
    below its cap its increments `L + 1` grow by one per step, and those of `T` by at
    most one (or drop at its cap): `f` is convex, and since `f` is checked at `L = 1`
    first, bisection finds the first `L` where it is positive. Past `Q`'s cap `f`
    never grows again (one step, where `Q` reaches its cap, is checked alone), and if
    it is not positive there the rule never stores again.

    Work: O(c) per store (the constants) plus O(log n) per store to find the next
    one; positions are cached per `checkpoints`, so a longer loop resumes where a
    shorter one stopped. Memory O(c).
    """
    c = checkpoints
    if num_steps <= c:
        return tuple(range(1, num_steps + 1))
    searched, b, frozen = _ONLINE.pop(c, (c, list(range(c + 1)), False))
    if num_steps < searched:
        searched, b, frozen = c, list(range(c + 1)), False
    if not frozen:
        b, frozen = _fast_forward(b, c, num_steps)
        searched = num_steps
    _ONLINE[c] = (searched, b, frozen)
    while len(_ONLINE) > _ONLINE_CACHE_SIZE:
        del _ONLINE[next(iter(_ONLINE))]
    return tuple(b[1:])


def _rule_cost(length: int, free: int, cap: int) -> int:
    """`revolve_cost_capped(length, free, cap)` on Python ints: the revolve cost,
    or `cap` as soon as `r * length` exceeds `cap` (the rule's overflow guard: a
    cost just below the cap may be reported as the cap)."""
    if length <= 1:
        return 0
    if free == 0:
        return min(length * (length - 1) // 2, cap)
    r = _repetition_number(length, free + 1)
    if r * length > cap:
        return cap
    return min(r * length - beta(free + 2, r - 1), cap)


def _cost_one_slot(length: int, cap: int) -> int:
    """`_rule_cost(length, 1, cap)` in closed form: the repetition number is the
    smallest `r` with `(r + 1) (r + 2) / 2 >= length`."""
    if length <= 1:
        return 0
    r = max((math.isqrt(8 * length + 1) - 3) // 2, 0)
    while (r + 1) * (r + 2) // 2 < length:
        r += 1
    if r * length > cap:
        return cap
    return min(r * length - (r + 2) * (r + 1) * r // 6, cap)


def _capped_costs(lengths, free, cap: int) -> list[int]:
    """`revolve_cost_capped` for each pair, exactly as the rule computes them;
    Python ints for a few, NumPy (the rule's own function) for many. A stretch of
    `l` steps with `s >= max(l - 2, 1)` free slots costs `l - 1` (repetition number
    1; `cap` past it), with no table lookup: with many slots most stretches are so."""
    if len(lengths) <= 32:
        return [_rule_cost(lo, s, cap) for lo, s in zip(lengths, free, strict=True)]
    lengths = np.asarray(lengths, dtype=np.int32)
    free = np.asarray(free, dtype=np.int32)
    costs = np.where(lengths > cap, cap, np.maximum(lengths - 1, 0))
    (hard,) = np.nonzero((free < 1) | (lengths > free + 2))
    if len(hard) <= 32:
        for j in hard.tolist():
            costs[j] = _rule_cost(int(lengths[j]), int(free[j]), cap)
    else:
        costs[hard] = revolve_cost_capped(lengths[hard], free[hard], cap, np)
    return costs.tolist()


@ft.lru_cache(maxsize=32)
def online_table(checkpoints: int, num_steps: int) -> tuple[int, ...]:
    """`online.forward_slots(checkpoints, num_steps)`, the slot the online rule
    stores each `x_k` into (or -1), from the fast-forward: the compiled forward
    sweep's trace-time table. The slot of the replaced `b_i` is the `i`-th of the
    slots sorted by the step they hold. About 10x faster than stepping the rule's
    plans in NumPy (4096 steps: 0.024 against 0.27 s at c = 8, 0.13 against 0.90 s
    at c = 64), which the compile of every bounded loop used to pay."""
    c = checkpoints
    slots = [*range(min(c, num_steps))]
    if num_steps > c:
        stores: list[tuple[int, int]] = []
        _fast_forward([*range(c + 1)], c, num_steps, stores)
        slots += [-1] * (num_steps - c)
        order = [*range(c)]  # The slots of b_1 .. b_c.
        for k, i in stores:
            slot = order.pop(i - 1)
            order.append(slot)
            slots[k - 1] = slot
    return tuple(slots)


def _fast_forward(
    b: list[int], c: int, num_steps: int, stores: list | None = None
) -> tuple[list[int], bool]:
    """Apply the online rule's stores up to step `num_steps`, starting from the
    sorted positions `b` (with `b[0] = 0`) right after a store at `b[c]`. With
    `stores`, append each store to it as `(step, i)`: `x_step` replaced `b_i`."""
    cap = INT32_MAX // (2 * c + 4)

    def q(length):  # keeping: the last stretch with no free slot
        return min(length * (length - 1) // 2, cap)

    def t(length):  # the last stretch with one free slot
        return _cost_one_slot(length, cap)

    # The first length at which `t` reports the cap (`r * length` is increasing).
    lo, hi = 1, 2
    while t(hi) < cap:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if t(mid) == cap else (mid, hi)
    t_cap = hi

    def t_capped_from(offset):  # the first L >= 1 with t(L + offset) == cap
        return max(1, t_cap - offset)

    # The last L for which Q(L + 1) = (L + 1) L / 2 is below the cap.
    top = (math.isqrt(8 * cap + 1) - 1) // 2
    while (top + 1) * top // 2 > cap:
        top -= 1
    while (top + 2) * (top + 1) // 2 <= cap:
        top += 1
    previous = (None, [])
    lengths = [b[j + 1] - b[j] for j in range(c)]  # stretch j = [b_j, b_{j+1})
    # Stretch j's cost with its own free slots (c - j) and with one more, and that of
    # stretches i - 1 and i merged (c - i + 1 free), i = 1 .. c - 1, at merged[i - 1].
    own = _capped_costs(lengths, [c - j for j in range(c)], cap)
    more = _capped_costs(lengths, [c - j + 1 for j in range(c)], cap)
    merged = _capped_costs(
        [lengths[i - 1] + lengths[i] for i in range(1, c)],
        [c - i + 1 for i in range(1, c)],
        cap,
    )
    while True:
        keep = sum(own)
        # Replacing b_i, i < c: stretches before i - 1 as they are, i - 1 and i merged
        # (c - i + 1 free), i + 1 .. c - 1 with one more free slot, and the last
        # stretch [b_c, k) with one free slot, T(L).
        # (Sums with C-level builtins: c is up to thousands.)
        before = [*itertools.accumulate(own, initial=0)]  # before[j] = own[:j]
        after = [*itertools.accumulate(reversed(more), initial=0)][::-1]  # more[j:]
        # inner[i - 1] = before[i - 1] + merged[i - 1] + after[i + 1], i = 1 .. c - 1.
        inner = [*map(operator.add, map(operator.add, before, merged), after[2:])]
        # Replacing b_c: the last two stretches merged, [b_{c-1}, k), one free slot.
        last = before[c - 1]
        gap = b[c] - b[c - 1]
        options = []
        low = min(inner) if inner else None
        if low is not None:
            options.append(
                (
                    lambda length, keep=keep, low=low: (
                        keep + q(length + 1) - low - t(length)
                    ),
                    0,
                )
            )
        options.append(
            (
                lambda length, keep=keep, last=last, gap=gap: (
                    keep + q(length + 1) - last - t(length + gap)
                ),
                gap,
            )
        )
        limit = num_steps - b[c]
        first = None
        for f, offset in options:
            found = _first_positive(f, limit, top, t_capped_from(offset))
            if found is not None and (first is None or found < first):
                first = found
        if first is None:
            return b, limit > top
        k = b[c] + first
        # The rule takes the first cheapest: the best inner option on a tie.
        if low is not None and low + t(first) <= last + t(first + gap):
            i = inner.index(low) + 1
        else:
            i = c
        if stores is not None:
            stores.append((k, i))
        signature = (first, i, keep, last, t(1 + gap), inner)
        if (
            stores is None
            and signature == previous[0]
            and (grown := _unit_step(previous[1], lengths)) is not None
        ):
            # Saturated: this store is priced exactly as the previous one, and the
            # stretches differ from the previous ones by one step in one stretch,
            # whose costs (all at the cap: they are non-decreasing, and would
            # otherwise have grown) do not change. Each store repeats the same
            # move, one step later, up to step `num_steps`.
            lengths[grown] += num_steps - b[c]
            return [0, *itertools.accumulate(lengths)], False
        previous = (signature if first == 1 else None, lengths)
        b = b[:i] + b[i + 1 :] + [k]
        # Storing x_k in place of b_i changes the stretches from i - 1 on: i - 1 and
        # i (or [b_c, k) for i = c) merge, the later ones move one place down (one
        # more free slot: their old `more` is their new `own`), then [b_c, k).
        if i < c:
            lengths = [*lengths[: i - 1], lengths[i - 1] + lengths[i]]
            lengths += [*previous[1][i + 1 :], first]
            own = [*own[: i - 1], merged[i - 1], *more[i + 1 :], t(first)]
        else:
            lengths = [*lengths[: c - 1], lengths[c - 1] + first]
            own = [*own[: c - 1], t(lengths[c - 1])]
        tail = range(i - 1, c)
        more = more[: i - 1] + _capped_costs(
            [lengths[j] for j in tail], [c - j + 1 for j in tail], cap
        )
        tail = range(max(i - 1, 1), c)
        merged = merged[: max(i - 2, 0)] + _capped_costs(
            [lengths[m - 1] + lengths[m] for m in tail], [c - m + 1 for m in tail], cap
        )


def _unit_step(before: list[int], after: list[int]) -> int | None:
    """The index `j` if `after` is `before` plus one at `j`, else None."""
    if len(before) != len(after):
        return None
    diff = [j for j, (x, y) in enumerate(zip(before, after, strict=True)) if x != y]
    if len(diff) == 1 and after[diff[0]] == before[diff[0]] + 1:
        return diff[0]
    return None


def _first_positive(f, limit: int, top: int, capped: int) -> int | None:
    """The first `L` in `[1, limit]` with `f(L) > 0`, or None. `f(L) = const +
    Q(L + 1) - T(L + d)`: convex on `[1, capped - 1]` and on `[capped, top]`, where
    `T` is constant (at its cap) from `capped` on, so non-decreasing there; constant
    from `top + 1` on (`Q` at its cap)."""

    def first_in(lo, hi, monotone):  # the first positive in [lo, hi], or None
        if lo > hi:
            return None
        if f(lo) > 0:
            return lo
        if not f(hi) > 0:
            # Convex with f(lo) <= 0 and f(hi) <= 0, or non-decreasing: none.
            return None
        while hi - lo > 1:  # f(lo) <= 0 < f(hi): the positives are an up-set.
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if f(mid) > 0 else (mid, hi)
        return hi

    end = min(limit, top)
    found = first_in(1, min(capped - 1, end), False)
    if found is None:
        found = first_in(max(capped, 1), end, True)
    if found is None and top + 1 <= limit and f(top + 1) > 0:
        found = top + 1
    return found
