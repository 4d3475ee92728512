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
  only, whose difference is convex, so the next store is found in closed form
  (checked, with bisection as the fallback); the options' prices are kept as prefix
  sums and running minima, repriced from the replaced position on only
  (`_Prices`); repeated cycles of stores that only grow one stretch (most stores
  when `c` is large) are jumped over whole (`_cycle_jump`); and so are runs of
  stores in the last stretches that end by replacing a deeper position and leave
  the last stretches, and the best price of the first ones, as they found them
  (`_Period`).

Everything here is checked against the exact replay (`replay.py`, which runs the real
rules step by step) over a grid of `(n, c)` in the tests: if the online rule changes,
`online_positions` must change with it.

References: Griewank & Walther (2000), *Algorithm 799: Revolve* (full entries:
docs/how-it-works.md, References).
"""

import collections
import functools as ft
import itertools
import math
from typing import NamedTuple

import numpy as np

from .offline import (
    _repetition_number,
    beta,
    revolve_cost,
    revolve_split_int,
)
from .wide import rule_cap


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

    Work: O(c - i) per store visited that replaces `b_i` (`_Prices`; with many
    slots most replace one of the last few) plus a few closed forms to find the
    next one (`_first_positive_guess`). Repeated cycles of up to
    `_CYCLE_STORES / 2` stores are jumped over in O(log n) closed forms per change
    of a repetition number (`_cycle_jump`); with many slots that skips most stores
    (1000 slots: ~1700 of the ~200 000 stores up to 400 000 steps are visited).
    Past ~c²/2 steps the cycles nest: runs of stores in the last stretches that
    end by replacing a deeper `b_i` and leave the state as they found it, but for
    the first stretches, are repeated whole (`_Period`, O(c - i) each), and so
    are runs of such runs. Without either (few slots) every store is still
    visited, at ~3 us: stores in place of one of the last eight `b_i` in a lean
    loop (`_shallow_run`), the next store of each option cached (`first_store`),
    the last few stretches repriced in place (`_Prices._update_short`). Right
    after the fill, while every stretch is trivial to reverse, the stores are
    found in O(1) each (`_trivial_stores`), and once the first stretch's cost is
    at the cap with a trivial tail, all later ones at once (`_saturated_stores`).
    Positions are cached per `checkpoints`, so a longer loop resumes where a
    shorter one stopped. Memory O(c) (and the last `_CYCLE_STORES` stores' prices
    and stretches).
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
    """`revolve_cost_capped` for each pair, exactly as the rule computes them, on
    Python ints. With `s >= 1` free slots a stretch of `l <= s + 2` steps costs
    `l - 1` (repetition number 1) and one of `l <= (s + 2) (s + 3) / 2` costs `2 l
    - s - 3` (2), or `cap` past it, with no table lookup: with many slots most
    stretches and merges are so (40 000 slots: every merge of two stretches
    is of repetition number 2). The others repeat (the same few lengths come back
    with the same free slots, store after store), so their costs are memoized."""
    return [
        (0 if lo <= 1 else lo - 1 if lo <= cap else cap)
        if 1 <= s and lo <= s + 2
        else (2 * lo - s - 3 if 2 * lo <= cap else cap)
        if 1 <= s and 2 * lo <= (s + 2) * (s + 3)
        else _memo_rule_cost(lo, s, cap)
        for lo, s in zip(lengths, free, strict=True)
    ]


def _cost_array(lengths, free, cap: int):
    """`_capped_costs` on int64 NumPy arrays (`free >= 1`)."""
    one = lengths <= free + 2  # repetition number 1
    two = 2 * lengths <= (free + 2) * (free + 3)  # 2
    costs = np.where(
        one,
        np.where(lengths <= 1, 0, np.minimum(lengths - 1, cap)),
        np.where(2 * lengths <= cap, 2 * lengths - free - 3, cap),
    )
    for k in np.flatnonzero(~two).tolist():
        costs[k] = _memo_rule_cost(int(lengths[k]), int(free[k]), cap)
    return costs


# Bounded, so planning keeps a constant memory footprint besides its O(c) state.
_memo_rule_cost = ft.lru_cache(maxsize=1 << 14)(_rule_cost)


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
    cap = rule_cap(c)

    def q(length):  # keeping: the last stretch with no free slot
        return min(length * (length - 1) // 2, cap)

    @ft.lru_cache(maxsize=1 << 12)  # The same few lengths, store after store.
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

    @ft.lru_cache(maxsize=1 << 12)
    def first_store(constant, offset):
        # The first L >= 1 with f(L) = constant + Q(L + 1) - T(L + offset) > 0, or
        # None: when an option priced `-constant` relative to keeping stores.
        # `f` does not grow past `top + 1` (`_first_positive`), so the first L
        # within a limit is this one if it is within. The same few pairs come
        # back store after store (16 slots, 10**6 steps: ~320 for ~145 000
        # searches), hence the cache, bounded so that memory stays O(c).
        def f(length):
            return constant + q(length + 1) - t(length + offset)

        capped = t_capped_from(offset)
        # The guess is the first positive if f is positive there and not at 1
        # and the step before: f is convex up to `bound` (`_first_positive`).
        bound = min(top, capped - 1)
        found = _first_positive_guess(constant, offset) if bound >= 1 else None
        if (
            found is not None
            and found <= bound
            and f(found) > 0
            and (found == 1 or (f(1) <= 0 and f(found - 1) <= 0))
        ):
            return found
        return _first_positive(f, top + 1, top, capped)

    def stores_before(constant, offset, limit):
        # Whether the option stores by L = `limit`.
        found = first_store(constant, offset)
        return found is not None and found <= limit

    previous = (None, [])
    history = []  # The last stores: state before, prices, decision (`_cycle_jump`).
    quiet = 0  # No cycle is tried while the history holds at most `quiet` stores.
    # Stores to skip after a try that found no cycle, doubled after each such try.
    backoff = 0
    lengths = [b[j + 1] - b[j] for j in range(c)]  # stretch j = [b_j, b_{j+1})
    end = _trivial_stores(lengths, c, b[c], num_steps, cap, stores)
    if end == num_steps:
        return [0, *itertools.accumulate(lengths)], False
    prices = _Prices(lengths, c, cap)
    # Runs need two stretches before `t0 < c` (`_signature`); the stores they
    # repeat are not recorded.
    periods = _Periods(c) if c >= 3 and stores is None else None
    # Stores left to the general path before the next `_shallow_run` (after one
    # that stopped on a cycle, so that `_cycle_jump` sees it).
    general = 0
    # Whether the last such stop has not led to a jump yet; how many runs to
    # make without stopping on cycles after one that did not, doubled each time.
    untried, skip, skip_next = False, 0, 0
    while True:
        if (
            c >= 2
            and prices.own[0] == cap == prices.merged[0]
            and _saturated_stores(lengths, c, end, num_steps, cap, stores)
        ):
            return [0, *itertools.accumulate(lengths)], False
        if c >= 3 and general == 0:
            if untried:  # The cycle it stopped on was not one `_cycle_jump` takes.
                untried, skip = False, skip_next
                skip_next = min(2 * skip_next + 1, _SHALLOW_SKIP)
            run_end, deepest, cycling = _shallow_run(
                prices, end, num_steps, t, first_store, stores, skip == 0
            )
            skip = max(skip - 1, 0)
            if cycling:
                general, untried = 2 * _SHALLOW_CYCLE + 1, True
            if run_end > end:
                # As for a cycle: stretches `deepest - 1` on changed.
                if periods is not None:
                    periods.grew(deepest - 1)
                end = run_end
                previous = (None, [])
                history.clear()
                quiet = backoff = 0
        keep = prices.before[c]
        # Replacing b_c: the last two stretches merged, [b_{c-1}, k), one free slot.
        last = prices.before[c - 1]
        gap = lengths[c - 1]
        jump = None
        if len(history) > quiet:
            jump = _cycle_jump(
                history, lengths, c, cap, num_steps - end, q, t, stores_before
            )
        if isinstance(jump, int):
            # The cycle does not repeat: it diverges within its next `jump` stores,
            # so trying it again before those are in the history is wasted work.
            quiet = len(history) + jump
        elif jump is None and len(history) > quiet:
            # With few slots cycles are rare (16 slots, 10**6 steps: 10 jumps in
            # 72 546 tries, a third of the time): try less often after each miss.
            # A cycle repeats many times, so a later try still finds it.
            quiet = len(history) + backoff
            backoff = min(2 * backoff + 1, _CYCLE_BACKOFF)
        elif jump is not None:
            p, growth, period = jump
            if stores is not None:  # The cycle's stores, repeated.
                step = end
                while step < end + growth:
                    for first, i in [state.decision for state in history[-period:]]:
                        step += first
                        stores.append((step, i))
            # Only stretch p grew: the prices from stretch p on change.
            if periods is not None:
                periods.grew(p)
            lengths[p] += growth
            end += growth
            prices.update(p)
            previous = (None, [])
            history.clear()
            quiet = backoff = 0
            untried, skip_next = False, 0
            continue
        limit = num_steps - end
        found = _next_store(prices, limit, first_store, t)
        if found is None:
            return [0, *itertools.accumulate(lengths)], limit > top
        first, i = found
        k = end + first
        if stores is not None:
            stores.append((k, i))
        general = max(general - 1, 0)
        state = _Store(
            lengths.copy(), prices.value.copy(), prices.paid[c], keep, last, (first, i)
        )
        # The prices of the options (`paid` matters only to the inner ones).
        paid = state.paid if c > 1 else None
        signature = (t(1 + gap), state.value, paid, keep, last, state.decision)
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
            lengths[grown] += num_steps - end
            return [0, *itertools.accumulate(lengths)], False
        previous = (signature if first == 1 else None, state.lengths)
        history.append(state)
        if len(history) > _CYCLE_STORES:
            del history[0]
            quiet -= 1
        period = None if periods is None else periods.ended(i, k, first, prices)
        end = _store(prices, i, k, first)
        if periods is not None:
            periods.stored(i, k, lengths)
            if period is not None and period.signature == _signature(prices, period.t0):
                end = period.repeat(prices, end, num_steps)
                periods.restart(c, end, lengths)
                previous = (None, [])
                history.clear()
                quiet = 0


def _next_store(prices, limit, first_store, t):
    """The rule's next store from the positions `prices` has: `(L, i)`, `x_k` for
    `k = L` steps after the last store goes in place of `b_i`, or None if neither
    option stores within `limit` steps. The first of the two options to beat
    keeping stores (`first_store(constant, offset)`: the first `L` with
    `constant + Q(L + 1) - T(L + offset) > 0`, for the best inner option, offset
    0, and replacing `b_c`, offset the stretch before it); then the rule takes
    the first cheapest, the inner option on a tie."""
    c = prices.c
    keep, last, gap = prices.before[c], prices.before[c - 1], prices.lengths[c - 1]
    inner = prices.best_inner() if c > 1 else None
    options = (
        [(keep - last, gap)]
        if inner is None
        else [(keep - inner, 0), (keep - last, gap)]
    )
    first = None
    for constant, offset in options:
        found = first_store(constant, offset)
        if found is not None and found <= limit and (first is None or found < first):
            first = found
    if first is None:
        return None
    if inner is not None and inner + t(first) <= last + t(first + gap):
        return first, prices.best_option()
    return first, c


def _shallow_run(prices, end, num_steps, t, first_store, stores, stop_on_cycles):
    """The rule's stores from the state right after a store at step `end`, as
    long as each replaces one of the last `_SHALLOW` positions `b_i` (and `i >=
    3`), in a loop without the general path's bookkeeping: `(end, deepest,
    cycling)`, the step of the last store made, the smallest `i` replaced (`c +
    1` if none) and whether the run stopped on a cycle of at most
    `_SHALLOW_CYCLE` stores (the last ones repeating the ones before them, looked
    for only with `stop_on_cycles` or among stores one step apart), which
    `_cycle_jump` jumps over whole in the general path. `prices` is kept up to date; `stores` gets each store.

    With few slots nearly every store is so, and is visited anyway: no cycle or
    period repeats exactly (8 slots, 10**7 steps: 341 000 stores, 87% in place
    of `b_8`, in runs of ~8 between stores deeper in the slots, whose steps grow
    store by store). Without the history of `_cycle_jump`, the stack of
    `_Periods` and the saturation checks, a store costs about half (measured at
    10**7 steps: 8 slots 2.25 -> 1.15 s, 16 slots 3.70 -> 1.98 s, 64 slots 0.64 ->
    0.45 s; 10**8 steps, 8 slots 22.9 -> 15.0 s). The caller
    counts the run as `_cycle_jump`'s growths are counted, in place of
    `b_deepest`, which keeps `_Period` exact (its signature is checked against
    the state; fewer runs are found, and with many slots most stores are deeper
    than the last eight). Stores in place of `b_1`, `b_2` change stretches 0 and
    1, on which the saturation shortcuts depend, so they stop the run."""
    c = prices.c
    lowest = max(c - _SHALLOW + 1, 3)
    deepest = c + 1
    decisions: list[tuple[int, int]] = []
    while True:
        found = _next_store(prices, num_steps - end, first_store, t)
        if found is None:
            return end, deepest, False
        first, i = found
        if i < lowest:
            return end, deepest, False
        # A store every step is always looked at: the general path jumps to the
        # end of such a run if its prices are saturated (`_unit_step`).
        if stop_on_cycles or first == 1:
            decision = (first, i)
            decisions.append(decision)
            count = len(decisions)
            for period in range(1, min(count // 2, _SHALLOW_CYCLE) + 1):
                if (
                    decisions[count - 1 - period] == decision
                    and decisions[-period:] == decisions[-2 * period : -period]
                ):
                    return end, deepest, True
            if count > 2 * _SHALLOW_CYCLE:
                del decisions[0]
        end += first
        if stores is not None:
            stores.append((end, i))
        _store(prices, i, end, first)
        if i < deepest:
            deepest = i


def _trivial_from(start: int, lengths: list[int], c: int, cap: int) -> bool:
    """Whether every stretch from `start` on, and every merge of two of them, is
    trivial to reverse (at most two steps more than its free slots, `c - j`) and
    priced exactly (`l - 1` below the cap): then each costs its length less one."""
    top = cap + 1
    return all(lengths[j] <= min(c - j + 2, top) for j in range(start, c)) and all(
        lengths[m] + lengths[m + 1] <= min(c - m + 2, top) for m in range(start, c - 1)
    )


def _trivial_stores(
    lengths: list[int], c: int, end: int, num_steps: int, cap: int, stores
) -> int:
    """The rule's stores while every stretch is trivial to reverse, in O(1) each:
    right after the slots fill (`lengths` all 1) with many slots, these are the
    first ~c stores, and repricing each (O(c): they replace `b_1`) made
    `schedule` O(c²) (5000 slots: 11 s for 10**5 steps).

    A stretch `j` is trivial when it and its merge with stretch `j + 1` have at
    most two steps more than their free slots (`c - j`): each costs its length
    less one, whatever the slots (`_capped_costs`). Then keeping costs `base +
    Q(L + 1)` for the stretches' sum `base`, replacing any `b_i`, `i < c`, costs
    `base + 1 + T(L)` (a merge costs one step more), and replacing `b_c`, with
    `X` the last stretch, `base - X + 1 + T(X + L)` (`Q`, `T`: no and one free
    slot). None is cheaper than keeping at `L = 1` (`Q(2) = 1`); at `L = 2` the
    inner options cost `base + 2 < base + 3`, and replacing `b_c` no less, so
    the rule stores `x_{end + 2}` in place of `b_1`, the first of the tied inner
    options. Stretch 0 absorbs stretch 1, the others move down one place (one
    more free slot: still trivial) and a stretch of 2 is appended, so only the
    new first merge and the new last one need checking. Updates `lengths` in
    place, appends to `stores` if given; returns the step of the last store (or
    `end`)."""
    # A trivial cost `l - 1` is the rule's exactly while `l <= cap + 1`: with more
    # than ~10**6 slots the cap ends the run (then the rule saturates).
    top = cap + 1
    if c < 2 or not _trivial_from(0, lengths, c, cap):
        return end
    first = lengths[0]
    rest = collections.deque(lengths[1:])
    while end + 2 <= num_steps:
        end += 2
        first += rest.popleft()
        rest.append(2)
        if stores is not None:
            stores.append((end, 1))
        # Still trivial: merging stretches 0 and 1 (c free slots), and the last
        # two (two free slots) if they are not those.
        if first + rest[0] > min(c + 2, top) or (len(rest) >= 2 and rest[-2] > 2):
            break
    lengths[:] = [first, *rest]
    return end


def _saturated_stores(
    lengths: list[int], c: int, end: int, num_steps: int, cap: int, stores
) -> bool:
    """Every store up to `num_steps` once the first stretch's cost is at the cap
    and the others are trivial (`_trivial_stores`), in O(c) for all of them: with
    more than ~10**6 slots the fill ends so (~32 000 until the rule's sums were
    widened in session 9), and each store repricing O(c) stretches made
    `schedule` O(c²) again. Returns False (changing nothing) if
    the stretches are not so.

    Replacing `b_1` then merges into a stretch priced at the cap either way, so it
    saves stretch 1's `l_1 - 1` and costs `T(L)`: cheaper than keeping
    (`Q(L + 1)`) at `L = 1` already, and than every other option (a trivial merge
    costs one more step; replacing `b_c` costs `T(X + 1) - (X - 1) >= 1`). So
    every step is stored in place of `b_1`: stretch 0 absorbs stretch 1, the
    others move down one place, and a stretch of 1 is appended, which keeps the
    state so. Updates `lengths` in place, appends to `stores` if given."""
    if not _trivial_from(1, lengths, c, cap):
        return False
    steps = num_steps - end
    if stores is not None:
        stores.extend((end + j, 1) for j in range(1, steps + 1))
    absorbed = min(steps, c - 1)
    rest = lengths[1 + absorbed :] + [1] * absorbed
    # Past the first c - 1 stores stretch 0 absorbs the appended stretches of 1.
    lengths[:] = [sum(lengths[: 1 + absorbed]) + steps - absorbed, *rest]
    return True


def _store(prices: "_Prices", i: int, k: int, first: int) -> int:
    """Store `x_k`, `first` steps after the last store, in place of `b_i`: returns
    `k`. The stretches change from `i - 1` on: `i - 1` and `i` (or `[b_c, k)` for
    `i = c`) merge, the later ones move one place down, then `[b_c, k)`."""
    lengths, c = prices.lengths, prices.c
    if i < c:
        lengths[i - 1] += lengths.pop(i)
        lengths.append(first)
    else:
        lengths[c - 1] += first
    prices.update(i - 1)
    return k


def _signature(prices: "_Prices", t0: int) -> tuple:
    """What the rule's decisions depend on while it only stores in place of `b_i`,
    `i > t0` (`_Period`): the stretches from `t0 - 1` on, and the price of the best
    option replacing some `b_i`, `i < t0`, less the stretches from `t0` on (`value`
    is relative to `P_c`, see `_Prices`)."""
    alpha = prices.low[t0 - 2][0] + prices.paid[t0] - prices.before[t0]
    return (*prices.lengths[t0 - 1 :], alpha)


class _Period(NamedTuple):
    """A run of stores that replaced `b_i`, `i > t0` only, ended by a store in place
    of some `b_i`, `i <= t0` (`_Periods`), `steps` after the run began; before it,
    the stretches from `t0` on were `tail`, and the last store was `first` steps
    earlier. The state before the run had `signature` (`_signature`), and so has
    the state after it.

    The rule's decisions in the run depend on the stretches before `t0` only
    through the price of the best option replacing some `b_i`, `i < t0`, relative
    to keeping (options replacing a later `b_i` and keeping price the stretches
    from `i - 1` on, with free slots `c - j` fixed by the index `j`; the option
    replacing `b_{t0}` merges stretches `t0 - 1` and `t0`), and that price, less
    the stretches from `t0` on, is fixed while they do not change. So from a state
    with the same signature the rule makes the same stores, up to the last one:
    the same `L`, replacing the first cheapest of the options `i <= t0` (their
    order does not depend on `L`). E.g. with 1000 slots near 10**6 steps the last
    ~11 stretches run through the same states every 84 steps (~19 stores, some
    jumped by `_cycle_jump`), then a deep `b_i` is replaced, and the best price of
    the first stretches stays put for thousands of runs; with 64 slots runs of 12
    or 34 steps repeat from a few thousand steps on."""

    t0: int
    steps: int
    tail: list[int]
    first: int
    signature: tuple

    def repeat(self, prices: "_Prices", end: int, num_steps: int) -> int:
        """Repeat the run while the state has the signature and the run ends by
        `num_steps`: O(c - t0) per run, plus the last store's O(c - i).

        The runs' last stores, deep in the slots, follow a pattern of their own
        (runs of runs): e.g. with 512 slots a 12-step run repeats ~200 000 times
        up to 3 * 10**6 steps, its last store replacing `b_502` five times, then
        `b_503`, and every few rounds `b_430`. So they are fed to a `_Periods` of
        their own, and a run of runs that leaves the state as it found it is
        repeated whole, and so on one level up (each level is exact by the same
        argument: the rule's decisions depend on the signature only)."""
        lengths, t0 = prices.lengths, self.t0
        runs = _Periods(prices.c)
        runs.restart(prices.c, end, lengths)
        while end + self.steps <= num_steps and _signature(prices, t0) == (
            self.signature
        ):
            lengths[t0:] = self.tail
            prices.update(t0)
            i = prices.best_option()
            assert i <= t0, "loopax internal error: a period did not repeat"
            k = end + self.steps
            period = runs.ended(i, k, self.first, prices)
            end = _store(prices, i, k, self.first)
            runs.stored(i, k, lengths)
            if period is not None and period.signature == _signature(prices, period.t0):
                end = period.repeat(prices, end, num_steps)
                runs.restart(prices.c, end, lengths)
        return end


class _Periods:
    """Finds `_Period`s: runs of stores whose `b_i` are all later than those of
    the stores that begin and end them. A stack of the stores whose `b_i` no later
    store has gone below (the previous smaller element, as in a monotone stack):
    `[i, k, the stretches from some index on after it, the smallest i stored after
    it]`, a jump of `_cycle_jump` growing stretch `p` counting as a store in place
    of `b_{p+1}`. O(1) amortised per store, plus a copy of the stretches the store
    changed (from `i - 1` on; the last `_PERIOD_TAIL` of them once the stack holds
    `_PERIOD_HELD * c` stretches, so memory stays O(c))."""

    def __init__(self, c: int):
        self.c = c
        self.stack: list[list] = []
        self.held = 0  # Stretches in the stack's snapshots.

    def grew(self, p: int) -> None:
        if self.stack:
            self.stack[-1][3] = min(self.stack[-1][3], p + 1)

    def _pop(self) -> list:
        entry = self.stack.pop()
        self.held -= len(entry[2])
        return entry

    def ended(self, i: int, k: int, first: int, prices: "_Prices") -> _Period | None:
        """Before the store of `x_k`, `first` steps after the last one, in place of
        `b_i`: the run it ends, if any (to check against the state after it)."""
        c, stack = self.c, self.stack
        least = c + 1
        while stack and stack[-1][0] > i:
            entry = self._pop()
            least = min(least, entry[0], entry[3])
        if not stack:
            return None
        anchor = stack[-1]
        least = min(least, anchor[3])
        anchor[3] = least
        t0 = least - 1
        snapshot = anchor[2]
        if not (i <= t0 < c and t0 >= 2 and c - t0 + 1 <= len(snapshot)):
            return None
        # The stretches before t0 are as they were after the anchor's store.
        alpha = prices.low[t0 - 2][0] + prices.paid[t0] - prices.before[t0]
        signature = (*snapshot[len(snapshot) - (c - t0 + 1) :], alpha)
        return _Period(t0, k - anchor[1], prices.lengths[t0:], first, signature)

    def stored(self, i: int, k: int, lengths: list[int]) -> None:
        """After the store of `x_k` in place of `b_i`. An entry with the same `i`
        can no longer begin a run (this one is later), so it is dropped, and what
        came after it is counted with the entry below: at most one entry per `i`."""
        stack = self.stack
        if stack and stack[-1][0] == i:
            entry = self._pop()
            if stack:
                stack[-1][3] = min(stack[-1][3], entry[0], entry[3])
        # The store changed the stretches from i - 1 on: O(c - i), like repricing.
        changed = self.c - i + 1
        if self.held + changed > _PERIOD_HELD * self.c:
            changed = min(changed, _PERIOD_TAIL)
        stack.append([i, k, lengths[-changed:], self.c + 1])
        self.held += changed

    def restart(self, c: int, end: int, lengths: list[int]) -> None:
        self.stack = [[1, end, lengths[:], c + 1]]
        self.held = c


# The stretches `_Periods` keeps per `c`, and per store past that.
_PERIOD_HELD = 4
_PERIOD_TAIL = 64


class _Prices:
    """The prices of the online rule's options for fixed positions `b_0 .. b_c`,
    kept up to date as the stretches change from some index on.

    Stretch `j` costs `own[j]` with its own free slots (`c - j`) and `more[j]` with
    one more; stretches `m` and `m + 1` merged cost `merged[m]` (`c - m` free).
    Replacing `b_{m+1}`, `m <= c - 2`, keeps stretches before `m`, merges `m` and
    `m + 1`, and gives each later stretch one more free slot: with `B_x` and `P_x`
    the sums of `own` and `more` before stretch `x`, it costs `B_m + merged[m] +
    P_c - P_{m+2}` besides the last stretch. Its part `value[m] = B_m + merged[m] -
    P_{m+2}` depends on stretches `0 .. m + 1` only, and `P_c` is common to all
    options, so the best option is the first minimum of `value`, shifted by `P_c`.

    A store in place of `b_i` (or a jump of `_cycle_jump` growing stretch `i - 1`)
    leaves stretches `0 .. i - 2` as they were, so `update(i - 1)` reprices from
    there: O(c - i) costs and sums, with the running first minimum of `value` kept
    per prefix. Past ~c²/2 steps with many slots, most stores replace one of the
    last few `b_i` (1000 slots, up to 10**6 steps: c - i is 11 on average), where
    pricing every stretch (O(c) per store) was most of the work."""

    def __init__(self, lengths: list[int], c: int, cap: int):
        self.lengths, self.c, self.cap = lengths, c, cap
        # Every list has its full length from the start (`update` reprices in place).
        self.own = [0] * c
        self.more = [0] * c
        self.merged = [0] * (c - 1)
        self.before = [0] * (c + 1)  # B_x, x = 0 .. c
        self.paid = [0] * (c + 1)  # P_x, x = 0 .. c
        self.value = [0] * (c - 1)  # m = 0 .. c - 2
        # The first minimum of value[: m + 1], as (value, m).
        self.low: list[tuple[int, int]] = [(0, 0)] * (c - 1)
        self.update(0)

    def update(self, start: int) -> None:
        """Reprice after a change of `lengths` from stretch `start` on (`lengths` is
        shared with the caller, which changes it in place)."""
        c, cap, lengths = self.c, self.cap, self.lengths
        if c - start <= _SHORT_TAIL:  # Most stores replace one of the last b_i.
            self._update_short(start)
            return
        if c - start > _NUMPY_TAIL:
            self._update_numpy(start)
            return
        tail = lengths[start:]
        for costs, extra in ((self.own, 0), (self.more, 1)):
            del costs[start:]
            costs += _capped_costs(tail, range(c - start + extra, extra, -1), cap)
        for sums, costs in ((self.before, self.own), (self.paid, self.more)):
            del sums[start + 1 :]
            sums += itertools.accumulate(costs[start:], initial=sums[start])
            del sums[start + 1]  # `initial`, repeated
        # value[m] depends on stretches m and m + 1 (merged) and those before.
        m0 = max(start - 1, 0)
        del self.merged[m0:], self.value[m0:], self.low[m0:]
        self.merged += _capped_costs(
            [lengths[m] + lengths[m + 1] for m in range(m0, c - 1)],
            range(c - m0, 1, -1),
            cap,
        )
        before, paid, merged = self.before, self.paid, self.merged
        self.value += [before[m] + merged[m] - paid[m + 2] for m in range(m0, c - 1)]
        low = self.low[-1] if self.low else None
        for m in range(m0, c - 1):
            if low is None or self.value[m] < low[0]:
                low = (self.value[m], m)
            self.low.append(low)

    def _update_numpy(self, start: int) -> None:
        """`update(start)` for a long tail, in NumPy (int64: the sums stay below
        `c * cap`): the same costs (`_cost_array`), sums and running first minimum
        of `value` (from accumulated minima), without a Python step per stretch."""
        c, cap, lengths = self.c, self.cap, self.lengths
        tail = np.array(lengths[start:], dtype=np.int64)
        free = np.arange(c - start, 0, -1, dtype=np.int64)  # stretch j: c - j
        own = _cost_array(tail, free, cap)
        more = _cost_array(tail, free + 1, cap)
        before = np.cumsum(own) + self.before[start]
        paid = np.cumsum(more) + self.paid[start]
        self.own[start:] = own.tolist()
        self.more[start:] = more.tolist()
        self.before[start + 1 :] = before.tolist()
        self.paid[start + 1 :] = paid.tolist()
        # value[m] = B_m + merged[m] - P_{m+2}, m = m0 .. c - 2.
        m0 = max(start - 1, 0)
        pairs = np.array(lengths[m0:], dtype=np.int64)
        merged = _cost_array(
            pairs[:-1] + pairs[1:], np.arange(c - m0, 1, -1, dtype=np.int64), cap
        )
        before = np.concatenate([self.before[m0 : start + 1], before])
        paid = np.concatenate([self.paid[m0 : start + 1], paid])
        value = before[: c - 1 - m0] + merged - paid[2:]
        self.merged[m0:] = merged.tolist()
        self.value[m0:] = value.tolist()
        # The first minimum of value[: m + 1] moves where value drops below all
        # the values before it.
        if m0 >= 1:
            floor, at = self.low[m0 - 1]
        else:
            floor, at = value[0] + 1, 0
        lows = np.minimum.accumulate(np.minimum(value, floor))
        drops = value < np.concatenate([[floor], lows[:-1]])
        where = np.where(drops, np.arange(m0, c - 1, dtype=np.int64), -1)
        where = np.maximum.accumulate(where)
        where = np.where(where < 0, at, where)
        self.low[m0:] = list(zip(lows.tolist(), where.tolist(), strict=True))

    def _update_short(self, start: int) -> None:
        """`update(start)` for a few last stretches, element by element in place:
        the same costs and sums, without the list operations that pay off for
        long tails (16 slots: 97% of the updates are of at most 4 stretches)."""
        c, cap, lengths = self.c, self.cap, self.lengths
        own, more, before, paid = self.own, self.more, self.before, self.paid
        for j in range(start, c):
            x = lengths[j]
            if x <= c - j + 2:  # Trivial with its slots, and with one more.
                own[j] = more[j] = x - 1 if x <= cap else cap
            else:
                own[j] = _memo_rule_cost(x, c - j, cap)
                more[j] = _memo_rule_cost(x, c - j + 1, cap)
            before[j + 1] = before[j] + own[j]
            paid[j + 1] = paid[j] + more[j]
        merged, value, lows = self.merged, self.value, self.low
        m0 = max(start - 1, 0)
        low = lows[m0 - 1] if m0 >= 1 else None
        for m in range(m0, c - 1):
            x = lengths[m] + lengths[m + 1]
            s = c - m
            merged[m] = (
                (x - 1 if x <= cap else cap)
                if x <= s + 2
                else (2 * x - s - 3 if 2 * x <= cap else cap)
                if 2 * x <= (s + 2) * (s + 3)
                else _memo_rule_cost(x, s, cap)
            )
            v = value[m] = before[m] + merged[m] - paid[m + 2]
            if low is None or v < low[0]:
                low = (v, m)
            lows[m] = low

    def best_inner(self) -> int:
        """The price of the best option replacing some `b_i`, `i < c`, besides the
        last stretch (`c >= 2`)."""
        return self.low[-1][0] + self.paid[self.c]

    def best_option(self) -> int:
        """That option's `i`, the first on a tie."""
        return self.low[-1][1] + 1


class _Store(NamedTuple):
    """A store of the fast-forward, for `_cycle_jump`: the stretches and prices
    before it (`value` and `paid` as in `_Prices`: the option replacing `b_{m+1}`
    costs `value[m] + paid` besides the last stretch), and `(L, i)`: it stored
    `L` steps after the last store, in place of `b_i`."""

    lengths: list[int]
    value: list[int]
    paid: int
    keep: int
    last: int
    decision: tuple[int, int]


# The most stores `_fast_forward` skips between tries of `_cycle_jump` that find
# nothing.
_CYCLE_BACKOFF = 15
# `_Prices.update` reprices this many last stretches or fewer element by element.
_SHORT_TAIL = 8
# Longer tails than this are repriced in NumPy (`_Prices._update_numpy`): with
# 1000 slots the repeated runs of `_Period` store deep (tails of ~600 stretches on
# average up to 10**8 steps). Measured: 10**8 steps, c = 1000: 18.7 -> 10.1 s; at
# 32 instead of 160, 11.0 s and c = 256 (10**7) 15% slower than the lists.
_NUMPY_TAIL = 160
# `_shallow_run` makes the stores in place of the last this many `b_i`, and stops
# on cycles of up to `_SHALLOW_CYCLE` stores. Measured at 10**7 steps, seconds
# (1 / 2 / 4 / 8 / all): 8 slots 1.44 / 1.11 / 0.98 / 1.07 / 1.00, 16 slots 2.97
# / 2.14 / 1.87 / 1.82 / 1.79, 64 slots 0.59 / 0.46 / 0.42 / 0.41 / 1.72, 1000
# slots ~2.5 up to 8, 43 with all (the general path's `_Period`s are lost).
# Cycles of up to 1, 2 or 4 stores: within the noise (8 slots ~1.1 s, 16 slots
# ~2.0 s, 1000 slots ~2.5 s).
_SHALLOW = 8
_SHALLOW_CYCLE = 2
# After a stop on a cycle that `_cycle_jump` then does not take, this many runs
# (0, 1, 3, 7, ... up to `_SHALLOW_SKIP`, from 0 again after a jump) do not stop on
# cycles: between ~130 and ~400 slots at 10**7 steps nearly all such stops were
# wasted (323 slots: 23 848 stops, 316 jumps; now 522 stops, the same 316 jumps;
# 5.05 -> 4.27 s, 362 slots 4.04 -> 3.61 s, 256 slots 2.73 -> 2.37 s, 1000 slots
# and 10**8 steps unchanged).
_SHALLOW_SKIP = 64
# How many of the last stores `_cycle_jump` remembers: it tries cycles seen twice in
# a row, so cycles of up to half as many stores.
_CYCLE_STORES = 64


def _cycle_jump(history, lengths, c, cap, steps_left, q, t, stores_before):
    """Jump over repetitions of a cycle of stores: `(p, growth, P)` if the stores
    after the current state (right after a store) repeat the last `P` stores, each
    cycle growing stretch `p` only, `growth` steps in all; `P` if the last `P` stores
    look like such a cycle but the next `P` do not repeat them; else None.

    With many slots most stores are such cycles: each stretch that becomes nontrivial
    to reverse is grown by merges while the stretches after it (the last slots) run
    through the same few states, e.g. with 1000 slots a store every 2 steps that
    merges the same two stretches, or past ~c²/2 steps cycles of 3 stores in 12
    steps. A cycle qualifies if its stores replace `b_i`, `i > p` only, some with
    `i = p + 1` (merging stretch `p` with the next one), and leave every stretch
    after `p` as it found them: then stretch `p`'s length `X` is the only change,
    and each of the cycle's decisions depends on `X` through four revolve costs of
    lengths `X + const` (stretch `p` with its own and one more free slot, its merges
    with the stretches before and after it), the other prices relative to keeping
    being constants. Between two points where the repetition number (or the cap) of
    one of those costs changes every cost is affine in `X`, and "this state makes
    the same decision" (the same store step `L` and option: the first cheapest
    below keeping, at the first `L`) is a conjunction of linear inequalities in
    `X`: it holds on an interval. So a repetition holds throughout such a stretch of
    `X` if it holds at both ends, and bisection finds where it stops otherwise.
    Exact, with O(P log) closed forms per stretch of `X`."""
    # Cheap filters first: only a cycle seen twice in a row (the same decisions)
    # that left the last stretch as it found it is tried.
    count = len(history)
    if count < 2:
        return None
    decision = history[-1].decision
    end = lengths[-1]
    for period in range(1, count // 2 + 1):
        if (
            history[-1 - period].decision != decision
            or history[-period].lengths[-1] != end
        ):
            continue
        decisions = [state.decision for state in history[-2 * period :]]
        if decisions[:period] != decisions[period:]:
            continue
        old = history[-period].lengths
        p = min([i for _, i in decisions[-period:]]) - 1
        if p <= c - 2 and old[p + 1 :] == lengths[p + 1 :] and old[p] < lengths[p]:
            growth = lengths[p] - old[p]
            break
    else:
        return None
    cycle = [
        _CycleState(state, p, c, cap, q, t, stores_before)
        for state in history[-period:]
    ]
    most = steps_left // growth  # whole cycles that fit

    def holds(m):
        return all(state.decides(m * growth) for state in cycle)

    def regime(m):
        return [state.regime(m * growth) for state in cycle]

    if most == 0:
        return None
    if not holds(1):
        return period
    lo = 1  # holds at lo
    while True:
        # The last m in [lo, most] in the same regime as lo (monotone in m).
        here = regime(lo)
        hi, step = lo, 1
        while hi + step <= most and regime(hi + step) == here:
            hi, step = hi + step, 2 * step
        while step > 1:
            step //= 2
            if hi + step <= most and regime(hi + step) == here:
                hi += step
        if holds(hi):
            if hi == most or not holds(hi + 1):
                return p, hi * growth, period
            lo = hi + 1
            continue
        # Holds at lo, not at hi: the repetitions that hold here are [lo, last].
        bad = hi
        while bad - lo > 1:
            mid = (lo + bad) // 2
            lo, bad = (mid, bad) if holds(mid) else (lo, mid)
        return p, lo * growth, period


class _CycleState:
    """One store of a cycle (`_cycle_jump`): its decision as a function of stretch
    `p`'s length, grown by `extra`."""

    def __init__(self, state, p, c, cap, q, t, stores_before):
        lengths, inner, paid, keep, last, self.decision = state
        self.p, self.c, self.cap, self.q, self.t = p, c, cap, q, t
        self.stores_before = stores_before
        self.x = lengths[p]
        self.before = lengths[p - 1] if p >= 1 else None
        self.after = lengths[p + 1]
        self.gap = lengths[-1]
        self.late = last - keep
        # Options j < p (one price shift g(X)), j > p + 1 (constant): the first
        # cheapest of each group, relative to keeping.
        self.group_a = _first_min(inner[: p - 1], 1) if p >= 2 else None
        self.group_b = _first_min(inner[p + 1 :], p + 2)
        self.keep = keep - paid  # `inner` is relative to `P_c` (`_Prices`)
        self.inner_p = inner[p - 1] if p >= 1 else None
        self.inner_q = inner[p]
        self.costs0 = self._costs(self.x)

    def _costs(self, x):
        c, p, cap = self.c, self.p, self.cap
        own = _rule_cost(x, c - p, cap)
        return (
            _rule_cost(x, c - p + 1, cap) - own,
            _rule_cost(self.before + x, c - p + 1, cap) - own if p >= 1 else 0,
            _rule_cost(x + self.after, c - p, cap) - own,
        )

    def regime(self, extra):
        c, p, x = self.c, self.p, self.x + extra
        lens = [(x, c - p), (x, c - p + 1), (x + self.after, c - p)]
        if p >= 1:
            lens.append((self.before + x, c - p + 1))
        out = []
        for length, free in lens:
            r = _repetition_number(length, free + 1)
            out.append((r, r * length > self.cap))
        return out

    def decides(self, extra):
        """Whether the rule, with stretch `p` `extra` steps longer, stores at the
        same `L` in place of the same `b_i`."""
        g, m, n = self._costs(self.x + extra)
        g0, m0, n0 = self.costs0
        candidates = []  # (price relative to keeping, option), by option
        if self.group_a is not None:
            candidates.append((self.group_a[0] - self.keep + g - g0, self.group_a[1]))
        if self.inner_p is not None:
            candidates.append((self.inner_p - self.keep + m - m0, self.p))
        candidates.append((self.inner_q - self.keep + n - n0, self.p + 1))
        if self.group_b is not None:
            candidates.append((self.group_b[0] - self.keep, self.group_b[1]))
        best, option = min(candidates)  # ties: the first option (smallest index)
        # No store before the decision's `L`, by either option (one evaluation at
        # each end of the convex pieces of the price difference), then one there.
        length = self.decision[0]
        if self.stores_before(-best, 0, length - 1) or self.stores_before(
            -self.late, self.gap, length - 1
        ):
            return False
        early = best + self.t(length)
        late = self.late + self.t(length + self.gap)
        if min(early, late) - self.q(length + 1) < 0:
            return (option if early <= late else self.c) == self.decision[1]
        return False


def _first_min(values, offset):
    """`(min, offset + its first index)`, or None if empty."""
    if not values:
        return None
    low = min(values)
    return low, offset + values.index(low)


def _unit_step(before: list[int], after: list[int]) -> int | None:
    """The index `j` if `after` is `before` plus one at `j`, else None."""
    if len(before) != len(after):
        return None
    diff = [j for j, (x, y) in enumerate(zip(before, after, strict=True)) if x != y]
    if len(diff) == 1 and after[diff[0]] == before[diff[0]] + 1:
        return diff[0]
    return None


def _first_positive_guess(constant: int, offset: int) -> int | None:
    """The first `L >= 1` with `constant + Q(L + 1) - T(L + offset) > 0`, ignoring
    the caps, or None: a guess for `_first_positive`, which the caller checks (two
    evaluations; see `_fast_forward`). While `T`'s repetition number `r` is fixed
    (`l = L + offset` in `(r (r + 1) / 2, (r + 1) (r + 2) / 2]`) `T(l) = r l - r (r +
    1) (r + 2) / 6` and the difference is a quadratic in `L`, solved with `isqrt`;
    the intervals of `r` are tried in order. A few integer operations instead of a
    bisection's ~2 log2(L) evaluations. As `T >= 0`, no `L` with `L (L + 1) / 2 <=
    -constant` is positive, so the search starts past those: an option far
    dearer than keeping (two slots, ~10**7 steps: half the searches) stores
    dozens of `r` intervals away from `L = 1`."""
    least = 1
    if constant < 0:
        least = (math.isqrt(-8 * constant + 1) - 1) // 2
        while least * (least + 1) // 2 <= -constant:
            least += 1
    length = least + offset
    r = max((math.isqrt(8 * length + 1) - 3) // 2, 0)
    while (r + 1) * (r + 2) // 2 < length:
        r += 1
    for _ in range(8):
        lo = max(1, r * (r + 1) // 2 + 1 - offset)
        hi = (r + 1) * (r + 2) // 2 - offset
        # 2 f(L) = L^2 + (1 - 2 r) L + 2 (constant - r offset + r (r + 1) (r + 2) / 6)
        term = 2 * (constant - r * offset) + r * (r + 1) * (r + 2) // 3
        disc = (2 * r - 1) ** 2 - 4 * term
        if lo * lo + (1 - 2 * r) * lo + term > 0:
            found = lo
        elif disc < 0:
            found = None
        else:
            found = max(lo, (2 * r - 1 + math.isqrt(disc)) // 2)
            while found * found + (1 - 2 * r) * found + term <= 0:
                found += 1
        if found is not None and found <= hi:
            return found
        r += 1
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
