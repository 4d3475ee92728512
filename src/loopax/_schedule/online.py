"""Online checkpointing: where to store states while the trip count is still unknown.

The forward sweep calls `online_step` right after computing each state and gets back the
slot to store it into (or -1). The rule is written against an array namespace `xp`
(either `numpy` or `jax.numpy`) on small int32 arrays, so the same code runs eagerly in
`loopax.schedule(...)` and traced in every forward step of the compiled loop.
"""

from typing import Any, NamedTuple

import numpy as np

from .offline import INT32_MAX, cond, revolve_cost_capped


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

    Work per step: one sort of the positions and $O(c)$ vectorised repetition numbers
    (each a fixed number of table lookups, no loop), skipped while a slot is empty. Costs
    are summed in int32 with each term capped at `(2**31 - 1) // (2 * checkpoints + 4)`;
    beyond that (loops of many millions of steps) options tie and the rule stops
    replacing checkpoints, which is valid but no longer near-optimal.

    **Arguments:**

    - `state`: the `OnlineState` from `online_init` or the previous call.
    - `step`: the index `k >= 1` of the state `x_k` just computed, an int32 scalar.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    A pair `(slot, new_state)`: `slot` is the int32 slot to store `x_step` into, or -1
    to not store it.

    ??? cite "References"

        ```bibtex
        @article{griewank2000revolve,
            author = {Griewank, Andreas and Walther, Andrea},
            title = {Algorithm 799: Revolve: An Implementation of Checkpointing for the
                     Reverse or Adjoint Mode of Computational Differentiation},
            journal = {ACM Transactions on Mathematical Software},
            volume = {26},
            number = {1},
            pages = {19--45},
            year = {2000},
        }
        @article{stumm2010online,
            author = {Stumm, Philipp and Walther, Andrea},
            title = {New Algorithms for Optimal Online Checkpointing},
            journal = {SIAM Journal on Scientific Computing},
            volume = {32},
            number = {2},
            pages = {836--854},
            year = {2010},
        }
        @article{wang2009minimal,
            author = {Wang, Qiqi and Moin, Parviz and Iaccarino, Gianluca},
            title = {Minimal Repetition Dynamic Checkpointing Algorithm for Unsteady
                     Adjoint Calculation},
            journal = {SIAM Journal on Scientific Computing},
            volume = {31},
            number = {4},
            pages = {2549--2567},
            year = {2009},
        }
        ```
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
    cap = INT32_MAX // (2 * c + 4)
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
    merged_cost = costs[..., 2 * c + 2 : 3 * c + 2]
    last_if_kept = costs[..., 3 * c + 2 :]
    # Keep: stretches 0 .. c - 1 as they are, then [b_c, step + 1) with no free slot.
    keep = xp.sum(keep_free[..., :c], axis=-1, keepdims=True, dtype=xp.int32)
    keep = keep + last_if_kept
    # Replace b_i (i = 1 .. c): stretches before i - 1 unchanged, stretches i - 1 and i
    # merged, the later ones with one more free slot, and [step, step + 1) for free.
    before = xp.cumsum(keep_free, axis=-1, dtype=xp.int32)[..., : c - 1]
    before = xp.concatenate([zero, before], axis=-1)
    after = xp.cumsum(one_more[..., ::-1], axis=-1, dtype=xp.int32)[..., ::-1]
    after = xp.concatenate([after[..., 2:], zero], axis=-1)
    replace = before + merged_cost + after
    options = xp.concatenate([keep, replace], axis=-1)
    best = xp.argmin(options, axis=-1).astype(xp.int32)
    return xp.where(best == 0, -1, order[xp.maximum(best - 1, 0)]).astype(xp.int32)


def forward_slots(checkpoints: int, num_steps: int) -> tuple[int, ...]:
    """The slot `online_step` stores each `x_k`, `k = 1 .. num_steps`, into (or -1),
    computed eagerly with NumPy for `loopax.schedule`.

    The decisions depend on nothing but `checkpoints` and `k`, so they are cached per
    `checkpoints` and extended on demand. Once the slots are full they change only when
    a checkpoint is replaced, which is rare; until then the rule prices a batch of
    steps in one vectorised call of the very same code and takes the first store.
    """
    slots, pos = _FORWARD.get(checkpoints, ([], online_init(checkpoints, np).slot_pos))
    gap = 1
    while len(slots) < num_steps:
        k = len(slots) + 1
        if np.any(pos < 0):
            slot, state = online_step(OnlineState(pos), np.int32(k), np)
            slots.append(int(slot))
            pos = state.slot_pos
            continue
        size = min(max(2 * gap, 8), 128, num_steps + 1 - k)
        batch = _greedy_slot(pos, np.arange(k, k + size, dtype=np.int32), np)
        (stores,) = np.nonzero(batch >= 0)
        kept = int(stores[0]) if len(stores) else size
        slots.extend([-1] * kept)
        gap += kept
        if len(stores):
            slot = int(batch[kept])
            slots.append(slot)
            pos = pos.copy()
            pos[slot] = k + kept
            gap = 1
    _FORWARD[checkpoints] = (slots, pos)
    return tuple(slots[:num_steps])


_FORWARD: dict[int, tuple[list[int], Any]] = {}
