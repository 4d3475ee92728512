"""Online checkpointing: where to store states while the trip count is still unknown.

The forward sweep calls `online_step` right after computing each state and gets back the
slot to store it into (or -1). The rule is written against an array namespace `xp`
(either `numpy` or `jax.numpy`) on small int32 arrays, so the same code runs eagerly in
`loopax.schedule(...)` and traced in every forward step of the compiled loop.
"""

import functools as ft
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import wide
from .offline import _MAX_SQUARE, INT32_MAX, cond, revolve_cost_capped, switch


# The compiled forward sweep looks the online decisions of the first steps up in a
# table computed at trace time (`online_table`), and runs the rule itself past it.
# Inside the table a store costs ~2.5 us on XLA:CPU, past it ~10 us (the rule's plan
# and its conditionals), and with many slots the rule stores about every second
# step: 16384 steps keep most loops inside the table (tiny body, c = 64, n = 5000:
# gradient 0.54x the time with 1024 steps; RK4 ODE 0.88x) for a trace-time table of
# 0.01-0.06 s, once per process, whatever `c` (the stores right after the fill are
# found in O(1) each: `counts._trivial_stores`), and constants of at most ~64 KB. A
# loop bounded by `max_steps` within the table has every decision tabled, so the
# rule is not compiled in at all: on XLA:CPU it is a third of the gradient's
# compile time. (Until session 8 the table held 1024 steps above 512 slots, where
# building it cost O(c²): 0.55 s at c = 1000; 16384 steps now give 0.75x the
# gradient time at c = 1000 and 2000, tiny body, n = 5000 and 20000.)
ONLINE_TABLE_STEPS = 16384


def online_table_length(max_steps: int | None, checkpoints: int) -> int:
    """How many of a loop's first decisions the trace-time table holds (the constant
    is read at call time, so tests can shrink the table)."""
    steps = ONLINE_TABLE_STEPS
    return steps if max_steps is None else min(steps, max_steps)


class OnlineState(NamedTuple):
    """The state of the online policy.

    - `slot_pos`: int32[checkpoints], the step `k` of the state `x_k` held by each slot,
        or -1 for an empty slot.
    """

    slot_pos: Any


def online_init(checkpoints: int, xp: Any) -> OnlineState:
    """The online policy's state before the first step: every slot empty.

    **Arguments:**

    - `checkpoints`: the number of slots, a positive Python int.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    An `OnlineState`.
    """
    return OnlineState(slot_pos=xp.full((checkpoints,), -1, dtype=xp.int32))


def online_step(state: OnlineState, step: Any, xp: Any) -> tuple[Any, OnlineState]:
    r"""Decide where to store the state `x_step` that was just computed.

    While a slot is empty, `x_step` goes into the first empty one. Once all slots are
    full, the rule is greedy with a one-step horizon: it prices every option as if the
    loop were to stop after the next step (trip count `step + 1`), and takes the
    cheapest. The options are keeping the slots as they are, or replacing the checkpoint
    of one slot by `x_step`. The price of an arrangement is exactly what the backward
    sweep will pay for it: every stretch between stored states is reversed optimally
    (revolve) with the slots free at that time, so the $i$-th stretch from the start
    gets `checkpoints - i` free slots. On a tie the slots are left alone, then the
    earliest checkpoint is replaced.

    Compared with the best placement chosen knowing the trip count, this costs a few
    percent more evaluations (see `loopax.schedule` and the tests for the exact
    figures); it is the exact optimum whenever `step <= checkpoints + 1`. Compared with
    the level-based minimal-repetition rule of Wang, Moin and Iaccarino it never stores
    the final state uselessly, and it targets total evaluations rather than the
    repetition number.

    Work per call: one sort of the positions and $O(c)$ vectorised repetition numbers
    (each a fixed number of table lookups, no loop), skipped while a slot is empty.
    This is the reference form of the rule; the compiled forward sweep and
    `forward_slots` make the same decisions from an `OnlinePlan`, rebuilt per store
    (usually from a few dozen revolve costs, whatever `c`: see `online_plan`), and
    $O(1)$ per step. Each revolve cost in a price is capped at `wide.rule_cap(c)`
    (`2**31 - 2` up to 16 381 slots) and the prices are summed exactly, in two int32
    limbs (`wide.py`), since they pass `2**31` on long loops. Once the first
    stretch's cost reaches the cap anyway (two slots: past 7.0·10**6 steps; 8 and
    16 slots: by 10**9), replacing $b_1$ is always cheapest: every later step is
    stored, and the slots hold the last `checkpoints` steps. Still valid, but those
    stores are wasted: about `n` more evaluations than the offline optimum, +0.5
    on the recompute factor (10**9 steps, 16 slots: 8.48 against 7.98). Until
    session 9 each cost was capped at `(2**31 - 1) // (2c + 4)` so that plain
    int32 sums fit, and this happened 10-100x sooner (10**7 steps, 1000 slots:
    2.47 against 1.97; 10**9 steps, 64 slots: 4.42 against 3.92; both optimal
    now).

    **Arguments:**

    - `state`: the `OnlineState` from `online_init` or the previous call.
    - `step`: the index `k >= 1` of the state `x_k` just computed, an int32 scalar.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    A pair `(slot, new_state)`: `slot` is the int32 slot to store `x_step` into, or -1
    to not store it.

    References: Griewank & Walther (2000), *Algorithm 799: Revolve*; Stumm & Walther
    (2010), *New algorithms for optimal online checkpointing*; Wang, Moin & Iaccarino
    (2009), *Minimal repetition dynamic checkpointing* (full entries:
    docs/how-it-works.md, References).
    """
    pos = state.slot_pos
    step = xp.asarray(step, dtype=xp.int32)
    empty = pos < 0
    slot = cond(
        xp.any(empty),
        lambda p: xp.argmax(p < 0).astype(xp.int32),
        lambda p: _greedy_slot(p, step, xp),
        pos,
        xp,
    )
    slots = xp.arange(pos.shape[0], dtype=xp.int32)
    new_pos = xp.where(slots == slot, step, pos).astype(xp.int32)
    return slot, OnlineState(slot_pos=new_pos)


def _greedy_slot(pos, step, xp):
    """With every slot full: the slot to overwrite with `x_step`, or -1 for none.

    `step` may have leading batch dimensions: with the slots fixed, the eager replay
    prices many steps at once (see `forward_slots`).
    """
    c = pos.shape[0]
    batch = xp.shape(step)
    cap, bits = wide.rule_cap(c), wide.limb_bits(c)
    order = xp.argsort(pos).astype(xp.int32)
    step = step[..., None]
    zero = xp.zeros(batch + (1,), dtype=xp.int32)
    sorted_pos = xp.broadcast_to(pos[order], batch + (c,))
    bounds = xp.concatenate([zero, sorted_pos, step], axis=-1)  # b_0 .. b_{c+1}
    lengths = bounds[..., 1:] - bounds[..., :-1]  # stretch j = [b_j, b_{j+1})
    merged = bounds[..., 2:] - bounds[..., :-2]  # removing b_i merges i - 1 and i
    last = step + 1 - bounds[..., c : c + 1]
    all_lengths = xp.concatenate([lengths, lengths, merged, last], axis=-1)
    free = c - xp.arange(c + 1, dtype=xp.int32)  # stretch j has c - j free slots
    all_free = xp.concatenate([free, free + 1, free[:-1], xp.zeros((1,), xp.int32)])
    all_free = xp.broadcast_to(all_free, all_lengths.shape)
    costs = revolve_cost_capped(all_lengths, all_free, cap, xp)
    keep_free = costs[..., : c + 1]  # stretch j with its own free slots
    one_more = costs[..., c + 1 : 2 * c + 2]  # stretch j with one more free slot
    merged_cost = wide.split(costs[..., 2 * c + 2 : 3 * c + 2], bits, xp)
    last_if_kept = wide.split(costs[..., 3 * c + 2 :], bits, xp)
    # Keep: stretches 0 .. c - 1 as they are, then [b_c, step + 1) with no free slot.
    own_sums = wide.cumsum(keep_free[..., :c], bits, xp)
    keep = wide.add(wide.take(own_sums, slice(c - 1, c)), last_if_kept)
    # Replace b_i (i = 1 .. c): stretches before i - 1 unchanged, stretches i - 1 and i
    # merged, the later ones with one more free slot, and [step, step + 1) for free.
    no_cost = wide.split(zero, bits, xp)
    before = wide.concatenate([no_cost, wide.take(own_sums, slice(None, c - 1))], xp)
    after = wide.cumsum(one_more, bits, xp, reverse=True)
    after = wide.concatenate([wide.take(after, slice(2, None)), no_cost], xp)
    replace = wide.add(before, merged_cost, after)
    best = wide.argmin(wide.concatenate([keep, replace], xp), bits, xp)
    return xp.where(best == 0, -1, order[xp.maximum(best - 1, 0)]).astype(xp.int32)


class OnlinePlan(NamedTuple):
    """The greedy rule of `online_step` between two stores, reduced to a few scalars.

    With every slot full and the slots unchanged, only the stretch after the last
    checkpoint grows with the step, so each option's price is a constant plus one
    revolve cost of that stretch. With $b_1 < \\dots < b_c$ the stored steps and
    $b_0 = 0$:

    - keeping: `keep + R(step + 1 - last, 0)`,
    - replacing the best of $b_1 .. b_{c-1}$: `early + R(step - last, 1)`,
    - replacing $b_c$: `late + R(step - second_last, 1)`,

    where `R` is `revolve_cost_capped`. The constants are computed once per store
    (`online_plan`); each step then costs $O(1)$.

    - `order`: int32[checkpoints], the slots sorted by the step they hold.
    - `keep`, `early`, `late`: int32 scalars, the constant parts of the prices
        (`early` is `INT32_MAX` for one slot).
    - `early_slot`, `late_slot`: int32 scalars, the slots those options overwrite.
    - `last`, `second_last`: int32 scalars, $b_c$ and $b_{c-1}$.
    """

    order: Any
    keep: Any
    early: Any
    early_slot: Any
    late: Any
    late_slot: Any
    last: Any
    second_last: Any


def online_plan(slot_pos, order, xp) -> OnlinePlan:
    """The `OnlinePlan` of full slots holding `slot_pos`, sorted by `order`.

    The same sums as `_greedy_slot`, regrouped: every term is capped the same way, so
    the prices, and the decisions with their tie-breaks, are identical. With many
    slots, the stretches past the first few are usually trivial to reverse (the rule
    keeps them short while they have many free slots), and a trivial stretch costs
    one step less than its length, with no table lookup (`_hard_extent`). Eagerly
    (NumPy), only the first `h` of `_HEADS` stretches are then priced in general
    (`_head_plan`): $O(h)$ revolve costs plus one elementwise pass instead of $O(c)$
    revolve costs. Compiled, with more than `FULL_PLAN_MAX_CHECKPOINTS` slots, the
    general costs are computed `PLAN_CHUNK` stretches at a time up to the last
    nontrivial one (`_chunked_plan`), so the gradient holds one copy of the revolve
    cost whatever `c`.
    """
    c = slot_pos.shape[0]
    cap = wide.rule_cap(c)
    bounds = xp.concatenate([xp.zeros((1,), dtype=xp.int32), slot_pos[order]])
    # A trivial stretch has at most c + 2 steps; its cost must stay below the cap.
    trivial_fits = c + 2 <= cap
    if xp is not np:
        if trivial_fits and c > max(FULL_PLAN_MAX_CHECKPOINTS, PLAN_CHUNK):
            return _chunked_plan(bounds, order, cap, PLAN_CHUNK)
        return _full_plan(bounds, order, cap, xp)
    heads = [h for h in _HEADS if h + 2 <= c and trivial_fits]
    if not heads:
        return _full_plan(bounds, order, cap, xp)
    branches = [ft.partial(_head_plan, cap=cap, xp=xp, h=h) for h in heads]
    branches.append(ft.partial(_full_plan, cap=cap, xp=xp))
    # The first head that covers every stretch that is not trivial.
    extent = _hard_extent(bounds, c, xp)
    index = sum((extent > h).astype(xp.int32) for h in heads)
    return switch(index, branches, (bounds, order), xp)


# The head lengths `online_plan` tries eagerly: it prices the first `h` stretches in
# general, the others in closed form when they allow it. Up to the square root of
# twice the loop length stretches can be nontrivial (each needs more steps than its
# free slots).
_HEADS = (8, 32, 128, 512)
# Compiled, with more than `FULL_PLAN_MAX_CHECKPOINTS` slots, the plan prices the
# nontrivial stretches `PLAN_CHUNK` at a time, in a loop; with fewer slots every
# stretch is usually nontrivial, and pricing them all at once is faster. Each
# variant of the plan is another compiled copy of the revolve cost, and XLA:CPU's
# compile time grows with it (the heads 8, 32 and 128 as `lax.switch` branches
# made the c = 128 gradient compile 1.6x, one head 1.34x): one loop instead.
# Measured per plan (jit, CPU): c = 1000, n = 5000: 4.9 us in chunks of 16, 217 us
# priced in full; c = 128, n = 20000: 26 and 31 us; c = 64, n = 20000: 20 and 16 us.
FULL_PLAN_MAX_CHECKPOINTS = 64
PLAN_CHUNK = 16


def _hard_extent(bounds, c: int, xp):
    """One past the last stretch `j` of `bounds` (`b_0 .. b_c`) that is not trivial
    to reverse with its free slots (`c - j`), alone or merged with the next one (0
    if none): a stretch of `l` steps with `s >= max(l - 2, 1)` free slots costs `l -
    1` (repetition number 1, no table lookup). One elementwise pass."""
    j = xp.arange(c, dtype=xp.int32)
    alone = bounds[1:] - bounds[:-1] > c - j + 2
    # Merging stretches j and j + 1: c - j free slots.
    merged = bounds[2:] - bounds[:-2] > c - j[:-1] + 2
    hard = alone | xp.concatenate([merged, xp.zeros((1,), dtype=bool)])
    return xp.max(xp.where(hard, j + 1, 0)).astype(xp.int32)


def _head_plan(bounds, order, cap: int, xp, *, h: int) -> OnlinePlan:
    """`_full_plan` when every stretch from `h` on is trivial (`_hard_extent`):
    those cost `l - 1` with one free slot more or less, so they sum to `b_c - b_h -
    (c - h)`, and replacing any `b_i`, `i > h`, merges two of them into one that
    costs one more: the same price for every such `i`, of which the rule would take
    the first. Only the first `h` stretches and the merges `i <= h` are priced in
    general: $O(h)$ revolve costs, whatever `c`."""
    c = order.shape[0]
    lengths = bounds[1 : h + 1] - bounds[:h]  # stretch j < h
    merged = bounds[2 : h + 2] - bounds[:h]  # replacing b_i, i = 1 .. h
    free = c - xp.arange(h, dtype=xp.int32)  # stretch j; merge i: free[i - 1]
    costs = revolve_cost_capped(
        xp.concatenate([lengths, lengths, merged]),
        xp.concatenate([free, free + 1, free]),
        cap,
        xp,
    )
    own, more, merged_cost = costs[:h], costs[h : 2 * h], costs[2 * h :]
    bits = wide.limb_bits(c)
    zero = wide.split(xp.zeros((1,), dtype=xp.int32), bits, xp)
    first_tail = bounds[h + 1] - bounds[h] - 1  # stretch H's cost, any free slots
    tail = bounds[c] - bounds[h] - (c - h)  # stretches j >= h
    own_sums = wide.cumsum(own, bits, xp)
    head = wide.take(own_sums, h - 1)
    before = wide.concatenate([zero, wide.take(own_sums, slice(None, h - 1))], xp)
    # after[i - 1] = more[i + 1] + ... + more[h - 1] + tail, for i = 1 .. h.
    more_after = wide.cumsum(
        xp.concatenate([more, first_tail[None]]), bits, xp, reverse=True
    )
    after = wide.concatenate([wide.take(more_after, slice(2, None)), zero], xp)
    after = wide.add(after, wide.split(tail - first_tail, bits, xp))
    prices = wide.add(before, wide.split(merged_cost, bits, xp), after)
    best = wide.argmin(prices, bits, xp)
    keep = wide.add(head, wide.split(tail, bits, xp))
    tail_price = wide.add(keep, wide.split(1, bits, xp))  # b_{h + 1}, any later
    use_tail = wide.less(tail_price, wide.take(prices, best), bits, xp)
    early = wide.where(use_tail, tail_price, wide.take(prices, best), xp)
    last_cost = wide.split(bounds[c] - bounds[c - 1] - 1, bits, xp)
    return _relative_plan(
        bounds,
        order,
        keep,
        early,
        order[xp.where(use_tail, h, best)],
        wide.sub(keep, last_cost),
        cap,
        xp,
    )


def _full_plan(bounds, order, cap: int, xp) -> OnlinePlan:
    """`online_plan` pricing every stretch: $O(c)$ revolve costs."""
    c = order.shape[0]
    lengths = bounds[1:] - bounds[:-1]  # stretch j = [b_j, b_{j+1}), j < c
    merged = bounds[2:] - bounds[:-2]  # removing b_i (i < c) merges i - 1 and i
    free = c - xp.arange(c, dtype=xp.int32)
    costs = revolve_cost_capped(
        xp.concatenate([lengths, lengths, merged]),
        xp.concatenate([free, free + 1, free[:-1]]),
        cap,
        xp,
    )
    return _plan_from_costs(
        bounds, order, costs[:c], costs[c : 2 * c], costs[2 * c :], cap, xp
    )


def _chunked_plan(bounds, order, cap: int, chunk: int) -> OnlinePlan:
    """`_full_plan`, compiled, for more than `chunk` slots, in $O(h)$ revolve costs
    for the first `h` stretches that are not trivial (`_hard_extent`).

    The stretches are priced `chunk` at a time in a loop (usually one iteration),
    carrying running sums and the best early option so far; past them, every
    stretch costs one step less than its length, with its own free slots or one
    more, and replacing any of their boundaries costs one step more than keeping
    (see `_head_plan`). With $B_m$ the own costs before stretch $m$, $P_m$ the
    one-more costs before it and $M$ all of them, replacing $b_{m+1}$ costs $B_m +$
    merged$_m + M - P_{m+2}$: the loop finds the best $B_m +$ merged$_m - P_{m+2}$
    before $M$ is known. First minima win, so the decisions are the full plan's.
    """
    c = order.shape[0]
    bits = wide.limb_bits(c)
    # b_0 .. b_c, then zero-length stretches (cost 0) for the last chunk to read.
    bounds = jnp.concatenate([bounds, jnp.broadcast_to(bounds[c], (chunk + 1,))])
    extent = _hard_extent(bounds[: c + 1], c, jnp)
    zero = wide.split(jnp.int32(0), bits, jnp)

    def price_chunk(index, carry):
        own_sum, late_sum, more_sum, best, best_merge = carry
        start = index * chunk
        # Stretches start .. start + chunk (one past the chunk, for the last merge).
        length = jnp.diff(lax.dynamic_slice(bounds, (start,), (chunk + 2,)))
        stretch = start + jnp.arange(chunk + 1, dtype=jnp.int32)
        free = jnp.maximum(c - stretch, 0)
        costs = revolve_cost_capped(
            jnp.concatenate([length, length, length[:-1] + length[1:]]),
            jnp.concatenate([free, free + 1, free[:-1]]),
            cap,
            jnp,
        )
        own, more = costs[:chunk], costs[chunk + 1 : 2 * chunk + 2]
        merged = costs[2 * chunk + 2 :]  # merge m = start + w (replacing b_{m+1})
        # One prefix sum for both rows (each is a kernel of its own on XLA:CPU).
        sums = wide.cumsum(jnp.stack([costs[: chunk + 1], more]), bits, jnp)
        own_through = wide.Wide(sums.hi[0, :chunk], sums.lo[0, :chunk])
        more_through = wide.Wide(sums.hi[1, 1:], sums.lo[1, 1:])
        before = wide.sub(
            wide.add(own_sum, own_through), wide.split(own, bits, jnp)
        )  # B_m
        value = wide.sub(
            wide.add(before, wide.split(merged, bits, jnp)),
            wide.add(more_sum, more_through),
        )
        value = wide.normalize(value, bits, jnp)
        value = wide.Wide(
            jnp.where(stretch[:-1] <= c - 2, value.hi, INT32_MAX), value.lo
        )
        w = wide.argmin(value, bits, jnp)
        value = wide.take(value, w)
        better = wide.less(value, best, bits, jnp)
        # The stretches of the chunk before the last one (c - 1).
        early_stretches = jnp.clip(c - 1 - start, 0, chunk)
        early_own = wide.take(own_through, jnp.maximum(early_stretches - 1, 0))
        early_own = wide.where(early_stretches > 0, early_own, zero, jnp)
        return (
            wide.add(own_sum, wide.take(own_through, chunk - 1)),
            wide.add(late_sum, early_own),
            wide.add(more_sum, wide.take(more_through, chunk - 2)),
            wide.where(better, value, best, jnp),
            jnp.where(better, start + w, best_merge),
        )

    chunks = (extent + chunk - 1) // chunk
    none = wide.Wide(jnp.int32(INT32_MAX), jnp.int32(0))
    init = (zero, zero, zero, none, jnp.int32(-1))
    own_sum, late_sum, more_sum, best, best_merge = lax.fori_loop(
        0, chunks, price_chunk, init
    )
    # Stretches from `priced` on cost one step less than their length.
    priced = chunks * chunk
    first_trivial = jnp.minimum(priced, c)
    trivial_sum = wide.split(
        bounds[c] - bounds[first_trivial] - (c - first_trivial), bits, jnp
    )
    keep = wide.add(own_sum, trivial_sum)
    last_is_trivial = priced <= c - 1
    last_cost = jnp.where(last_is_trivial, bounds[c] - bounds[c - 1] - 1, 0)
    late = wide.sub(wide.add(late_sum, trivial_sum), wide.split(last_cost, bits, jnp))
    # `best` stays unset only if no chunk was priced: then the tail is taken.
    best = wide.where(best_merge < 0, zero, best, jnp)
    general = wide.add(best, more_sum, trivial_sum)
    # Replacing b_{m+1}, m >= priced: one step more than keeping, the first one best.
    keep_plus_one = wide.add(keep, wide.split(jnp.int32(1), bits, jnp))
    use_tail = (priced <= c - 2) & (
        (best_merge < 0) | wide.less(keep_plus_one, general, bits, jnp)
    )
    early = wide.where(use_tail, keep_plus_one, general, jnp)
    early_slot = order[jnp.where(use_tail, jnp.minimum(priced, c - 1), best_merge)]
    return _relative_plan(bounds, order, keep, early, early_slot, late, cap, jnp)


def _plan_from_costs(bounds, order, own, more, merged_cost, cap: int, xp) -> OnlinePlan:
    """The plan from each stretch's revolve cost with its own free slots (`own`) and
    with one more (`more`), and that of stretches `i - 1` and `i` merged
    (`merged_cost[i - 1]`, `c - i + 1` free slots)."""
    c = order.shape[0]
    bits = wide.limb_bits(c)
    zero = wide.split(xp.zeros((1,), dtype=xp.int32), bits, xp)
    # Both running sums in one (own forward, more backward).
    sums = wide.cumsum(xp.stack([own, more[::-1]]), bits, xp)
    before = wide.concatenate([zero, wide.Wide(sums.hi[0], sums.lo[0])], xp)
    # after[i] = more[i + 1] + ... + more[c - 1], for i = 1 .. c - 1.
    after = wide.Wide(sums.hi[1, ::-1], sums.lo[1, ::-1])
    after = wide.concatenate([wide.take(after, slice(2, None)), zero], xp)
    early, early_slot = None, xp.int32(-1)
    if c > 1:
        early_prices = wide.add(
            wide.take(before, slice(None, c - 1)),
            wide.split(merged_cost, bits, xp),
            wide.take(after, slice(None, c - 1)),
        )
        best = wide.argmin(early_prices, bits, xp)
        early, early_slot = wide.take(early_prices, best), order[best]
    return _relative_plan(
        bounds,
        order,
        wide.take(before, c),
        early,
        early_slot,
        wide.take(before, c - 1),
        cap,
        xp,
    )


def _relative_plan(bounds, order, keep, early, early_slot, late, cap: int, xp):
    """The `OnlinePlan` from the exact constant parts of the three prices (`Wide`
    sums; `early` is None for one slot): each is stored as its excess over the
    least of them, clamped to `cap + 1` (`wide.relative`), which keeps the rule's
    decisions and fits in int32 with the growing stretch's cost added. The three
    are stacked: one argmin and one elementwise pass, where pairwise minima gave
    XLA scalar chains to copy into each consumer (c = 1000: 2164 -> 2119
    optimized HLO instructions for the plan)."""
    c = order.shape[0]
    bits = wide.limb_bits(c)
    parts = [keep, late] if early is None else [keep, late, early]
    stacked = wide.Wide(*(xp.stack(limbs) for limbs in zip(*parts, strict=True)))
    stacked = wide.normalize(stacked, bits, xp)
    base = wide.take(stacked, wide.argmin(stacked, bits, xp))
    excess = wide.relative(stacked, base, cap, bits, xp)
    return OnlinePlan(
        order=order,
        keep=excess[0],
        early=xp.int32(INT32_MAX) if early is None else excess[2],
        early_slot=xp.asarray(early_slot, dtype=xp.int32),
        late=excess[1],
        late_slot=order[c - 1],
        last=bounds[c],
        second_last=bounds[c - 1],
    )


def online_decide(plan: OnlinePlan, step, xp):
    """`_greedy_slot` from an `OnlinePlan`: the slot to overwrite with `x_step`, or -1,
    for an array of steps after `plan.last`. $O(1)$ per step."""
    c = plan.order.shape[0]
    cap = wide.rule_cap(c)
    step = xp.asarray(step, dtype=xp.int32)

    def add(constant, cost):  # Saturating at INT32_MAX (see `wide.relative`).
        return constant + xp.minimum(cost, INT32_MAX - constant)

    keep = add(plan.keep, _cost_no_slot(step + 1 - plan.last, cap, xp))
    # One slot: there is no early option (on a tie with `late`, nothing is stored).
    early = (
        add(plan.early, _cost_one_slot(step - plan.last, cap, xp))
        if c > 1
        else xp.full_like(keep, INT32_MAX)
    )
    late = add(plan.late, _cost_one_slot(step - plan.second_last, cap, xp))
    slot = xp.where(early <= late, plan.early_slot, plan.late_slot)
    return xp.where(xp.minimum(early, late) < keep, slot, -1).astype(xp.int32)


def _cost_no_slot(length, cap: int, xp):
    """`revolve_cost_capped(length, 0, cap, xp)`: `length * (length - 1) / 2`, capped."""
    length = xp.asarray(length, dtype=xp.int32)
    cap32 = xp.int32(cap)
    even = length % 2 == 0
    a = xp.where(even, length // 2, length)
    b = xp.where(even, length - 1, (length - 1) // 2)
    over = a > cap32 // xp.maximum(b, 1)
    cost = xp.where(over, cap32, xp.where(over, 0, a) * b)
    return xp.where(length <= 1, 0, xp.minimum(cost, cap32)).astype(xp.int32)


def _cost_one_slot(length, cap: int, xp):
    r"""`revolve_cost_capped(length, 1, cap, xp)` in closed form (no table lookups).

    With one free slot the repetition number $r$ is the smallest with $\beta(2, r) =
    (r + 1)(r + 2) / 2 \geq$ `length`, and the cost is $r \, l - \beta(3, r - 1)$,
    where $\beta(3, r - 1) = h (r + 2) / 3$ with $h = r (r + 1) / 2 < l$. Three
    divides $r + 2$ or else $h$, and is divided out first: unless $r l$ exceeds the
    cap (then the cost is the cap), the product is $\beta(3, r - 1) \leq r l \leq$
    `cap` and fits in int32."""
    length = xp.asarray(length, dtype=xp.int32)
    cap32 = xp.int32(cap)
    # A float estimate of r, then the exact count over a window of five around it.
    guess = xp.sqrt(2.0 * xp.maximum(length, 1).astype(xp.float32)) - 1.5
    low = xp.clip(xp.floor(guess).astype(xp.int32) - 2, 0, _MAX_SQUARE - 4)
    r = low
    for offset in range(5):
        m = low + offset
        odd = m & 1
        square = ((m + 1) >> odd) * ((m + 2) >> (1 - odd))  # beta(2, m), m <= 65534
        r = r + (square < length).astype(xp.int32)
    over = r > cap32 // xp.maximum(length, 1)
    r_safe = xp.where(over, 0, r)
    h = xp.where(
        r_safe % 2 == 0, r_safe // 2 * (r_safe + 1), (r_safe + 1) // 2 * r_safe
    )
    thirds = (r_safe + 2) % 3 == 0
    beta3 = xp.where(thirds, h * ((r_safe + 2) // 3), h // 3 * (r_safe + 2))
    cost = xp.where(over, cap32, r_safe * length - beta3)
    return xp.where(length <= 1, 0, xp.minimum(cost, cap32)).astype(xp.int32)


def online_store(slot_pos, plan: OnlinePlan, slot, step, xp):
    """`slot_pos` and `order` after storing `x_step` (later than every stored state)
    into the full slot `slot`: the slot moves to the end of the order. $O(c)$."""
    c = slot_pos.shape[0]
    order = plan.order
    index = xp.argmax(order == slot).astype(xp.int32)
    j = xp.arange(c, dtype=xp.int32)
    moved = order[xp.minimum(j + (j >= index).astype(xp.int32), c - 1)]
    order = xp.where(j == c - 1, slot, moved).astype(xp.int32)
    if xp is np:
        slot_pos = slot_pos.copy()
        slot_pos[slot] = step
    else:
        slot_pos = slot_pos.at[slot].set(step)
    return slot_pos, order


def next_store(plan: OnlinePlan, after, window: int, xp):
    """The first store strictly after step `after`, searched up to `after + window`:
    `(step, slot)`, or `(after + window, -1)` if there is none in that range.
    `after >= plan.last`; the work is $O(1)$ per step searched."""
    steps = after + 1 + xp.arange(window, dtype=xp.int32)
    slots = online_decide(plan, steps, xp)
    stores = slots >= 0
    first = xp.argmax(stores)
    found = stores[first]
    stop = xp.where(found, steps[first], after + window).astype(xp.int32)
    return stop, xp.where(found, slots[first], -1).astype(xp.int32)


# The most steps searched at once by `next_store` in the replay (the compiled loop
# uses its own window; the decisions do not depend on it).
_REPLAY_WINDOW = 1024


def forward_slots(checkpoints: int, num_steps: int) -> tuple[int, ...]:
    """The slot `online_step` stores each `x_k`, `k = 1 .. num_steps`, into (or -1),
    computed eagerly with NumPy for `loopax.schedule`.

    The decisions depend on nothing but `checkpoints` and `k`, so they are cached per
    `checkpoints` and extended on demand. The first `checkpoints` steps fill the slots
    in order; after that the rule runs from an `OnlinePlan`, rebuilt after each store
    and searched for the next store in $O(1)$ per step, exactly as the compiled
    forward sweep does.
    """
    c = checkpoints
    slots, slot_pos, plan = _FORWARD.get(c, ([], None, None))
    while len(slots) < num_steps:
        k = len(slots)  # The last step decided.
        if k < c:
            slots.append(k)
            if k + 1 == c:
                slot_pos = np.arange(1, c + 1, dtype=np.int32)
                plan = online_plan(slot_pos, np.arange(c, dtype=np.int32), np)
            continue
        assert plan is not None and slot_pos is not None
        stop, slot = k, -1
        window = 16
        while slot < 0 and stop < num_steps:
            stop, slot = next_store(plan, np.int32(stop), window, np)
            stop, slot = int(stop), int(slot)
            window = min(2 * window, _REPLAY_WINDOW)
        if slot < 0:
            stop = max(stop, k + 1)
        slots.extend([-1] * (stop - k - 1))
        slots.append(slot)
        if slot >= 0:
            slot_pos, order = online_store(slot_pos, plan, slot, np.int32(stop), np)
            plan = online_plan(slot_pos, order, np)
    _FORWARD[c] = (slots, slot_pos, plan)
    return tuple(slots[:num_steps])


_FORWARD: dict[int, tuple[list[int], Any, Any]] = {}
