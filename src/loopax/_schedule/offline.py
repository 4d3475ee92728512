"""Offline (binomial) checkpointing: reversing a segment of known length.

Once the forward sweep has ended, the trip count is known and every stretch between two
stored states can be reversed optimally with Griewank and Walther's *revolve*. This
module holds the closed-form cost of that reversal and the rule that places the next
checkpoint.

The split rule is written once against an array namespace `xp` (either `numpy` or
`jax.numpy`) on int32 scalars, so that the very same code runs eagerly in
`loopax.schedule(...)` and traced inside the backward sweep of the compiled loop.

References: Griewank & Walther (2000), *Algorithm 799: Revolve* (full entries:
docs/how-it-works.md, References).
"""

import functools as ft
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.lax as lax
import numpy as np


INT32_MAX = 2**31 - 1


def beta(c: int, r: int) -> int:
    r"""The binomial $\beta(c, r) = \binom{c + r}{c}$, zero for negative `r`.

    With `c` checkpoints (counting the one at the start of the segment) and every step
    recomputed at most `r` times, a segment of up to $\beta(c, r)$ steps can be
    reversed.

    **Arguments:**

    - `c`: the number of checkpoints, a non-negative Python int.
    - `r`: the repetition number, a Python int.

    **Returns:**

    A Python int.
    """
    if r < 0:
        return 0
    return math.comb(c + r, c)


def _repetition_number(length: int, c: int) -> int:
    r"""The smallest `r >= 0` with `beta(c, r) >= length` (Python ints, `c >= 1`).

    Starts from a lower bound and counts up, so it takes a few steps whatever
    `length` is: $\beta(c, r) = \prod_{i=1}^{c} (r + i) / c!$, and the arithmetic mean
    $r + (c + 1) / 2$ of the factors is at least their geometric mean
    $g = (\beta\, c!)^{1/c}$, so $r \geq g - (c + 1) / 2$ at $\beta = $ `length`.
    The gap is below $(c^2 - 1) / (24 (r + 1)) + 1$ (see `repetition_number`).
    With many slots the answer is small, and counting up from 0 is cheaper than
    the estimate (the planning helpers ask ~10**6 times at c = 1000: 2x faster).
    """
    if length <= 1:
        return 0
    if c == 1:
        return length - 1
    r, b = 0, 1
    while b < length and r < 4:
        r += 1
        b = b * (c + r) // r
    if b >= length:
        return r
    log_g = (math.log(length) + math.lgamma(c + 1)) / c
    r = max(0, math.floor(math.exp(log_g) - (c + 1) / 2) - 2) if log_g < 700 else 0
    while beta(c, r) >= length and r > 0:  # Guards the float estimate.
        r -= 1
    b = beta(c, r)
    while b < length:
        r += 1
        b = b * (c + r) // r
    return r


def revolve_cost(length: int, free_slots: int) -> int:
    r"""The fewest recomputations that reverse a segment of known length.

    The segment starts at a stored state (kept for the whole reversal) and has `length`
    steps; `free_slots` more states may be stored while reversing it. The optimum is
    Griewank and Walther's $t(l, c) = r l - \beta(c + 1, r - 1)$ with $c$ = `free_slots
    + 1` checkpoints, where $r$ is the smallest integer with $\beta(c, r) \geq l$. With
    no free slot this is $l (l - 1) / 2$; a segment of one step costs nothing.

    **Arguments:**

    - `length`: the number of steps in the segment, a non-negative Python int.
    - `free_slots`: the number of checkpoint slots free for the reversal, a non-negative
        Python int.

    **Returns:**

    The number of body evaluations besides the VJPs, a Python int.

    References: Griewank & Walther (2000), *Algorithm 799: Revolve* (full entries:
    docs/how-it-works.md, References).
    """
    if length <= 1:
        return 0
    if free_slots == 0:
        return length * (length - 1) // 2
    c = free_slots + 1
    r = _repetition_number(length, c)
    return r * length - beta(c + 1, r - 1)


def revolve_split_int(length: int, free_slots: int) -> int:
    """`revolve_split` on Python ints, for `length >= 2`, `free_slots >= 1`: the
    same offset (the tests compare them), with exact integers instead of int32
    arrays, so it also works past `2**31` and costs a few integer operations."""
    c = free_slots + 1
    r = _repetition_number(length, c)
    lo = max(beta(c, r - 2), length - beta(free_slots, r))
    return min(max(lo, 1), length - 1)


#
# Array code shared by the eager replay (`xp = numpy`) and the traced loop (`xp = jnp`).
#


def cond(
    pred: Any, true_fun: Callable, false_fun: Callable, operand: Any, xp: Any
) -> Any:
    """`jax.lax.cond` for `xp = jax.numpy`; a Python `if` for `xp = numpy`."""
    if xp is np:
        return true_fun(operand) if pred else false_fun(operand)
    return lax.cond(pred, true_fun, false_fun, operand)


def switch(index: Any, branches: Sequence[Callable], operands: tuple, xp: Any) -> Any:
    """`jax.lax.switch` for `xp = jax.numpy`; a Python index for `xp = numpy`."""
    if xp is np:
        return branches[int(index)](*operands)
    return lax.switch(index, branches, *operands)


# beta(c, r) = binom(c + r, c) is symmetric in c and r, and binom(m + k, k) with
# m >= k >= 17 is at least binom(34, 17) > INT32_MAX: below the cap, min(c, r) <= 16.
_MAX_SMALL = 16
_MAX_SQUARE = 65534  # the largest m with beta(2, m) <= INT32_MAX


@ft.cache
def _beta_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`beta(k, m)` capped at `INT32_MAX` for `k = 3 .. 16` and `m = 0 ..` the first `m`
    where it reaches the cap (3459 values): the rows end to end, each row's offset, and
    each row's last `m`. Rows 0 .. 2 are placeholders (closed forms are used there),
    row 17 holds the cap (`k >= 17`) and row 18 a zero (negative `r`)."""
    values, offsets, last = [], [], []
    for k in range(_MAX_SMALL + 3):
        row = [1 if k <= _MAX_SMALL else (INT32_MAX if k == _MAX_SMALL + 1 else 0)]
        while 3 <= k <= _MAX_SMALL and row[-1] < INT32_MAX:
            row.append(min(beta(k, len(row)), INT32_MAX))
        offsets.append(len(values))
        last.append(len(row) - 1)
        values.extend(row)
    return (
        np.array(values, dtype=np.int32),
        np.array(offsets, dtype=np.int32),
        np.array(last, dtype=np.int32),
    )


@ft.cache
def _log_factorial() -> np.ndarray:
    """`log(c!)` for `c = 0 .. 16`, float32."""
    return np.array([math.lgamma(c + 1) for c in range(17)], dtype=np.float32)


def beta_capped(c, r, xp):
    r"""$\beta(c, r) = \binom{c + r}{c}$ on int32 arrays, capped at `2**31 - 1`.

    Zero for negative `r`; `c >= 0`. Below the cap $k = \min(c, r) \leq 16$, so this is
    a closed form for $k \leq 2$ and a lookup in a table of 3459 values for $3 \leq k
    \leq 16$: a handful of elementwise operations, no loop.
    """
    c = xp.asarray(c, dtype=xp.int32)
    r = xp.asarray(r, dtype=xp.int32)
    rr = xp.maximum(r, 0)
    k = xp.minimum(c, rr)
    m = xp.maximum(c, rr)
    values, offsets, last = (xp.asarray(a) for a in _beta_table())
    # Row 17 holds the cap (k > 16), row 18 a zero (r < 0).
    row = xp.where(r < 0, _MAX_SMALL + 2, xp.minimum(k, _MAX_SMALL + 1))
    b = values[offsets[row] + xp.minimum(m, last[row])]
    linear = xp.minimum(m, INT32_MAX - 1) + 1
    # (m + 1) (m + 2) / 2, halving the even factor first (m >= 0: shifts, no division).
    m2 = xp.minimum(m, _MAX_SQUARE)
    odd = m2 & 1
    square = ((m2 + 1) >> odd) * ((m2 + 2) >> (1 - odd))
    square = xp.where(m > _MAX_SQUARE, xp.int32(INT32_MAX), square)
    return xp.where(k == 1, linear, xp.where(k == 2, square, b)).astype(xp.int32)


def repetition_number(length, c, xp, *, bisect: bool = False):
    r"""The smallest $r \geq 0$ with $\beta(c, r) \geq$ `length`, on int32 arrays.

    Requires `c >= 2`; `length` may be any int32. Works elementwise on arrays, with a
    fixed number of operations (no loop):

    - if $r \leq 17$ it is the number of $r' \in [0, 17]$ with $\beta(c, r') <$
        `length`: counted over all 18 (one wide operation: fastest for a scalar on
        XLA:CPU, as in the backward sweep's `revolve_split`) or, with `bisect`, found
        by bisection (five lookups: faster over many elements in NumPy, as in the
        planning helpers; compiled, its extra kernels cost more compile time than
        the lookups it saves);
    - otherwise $c \leq 16$ (as $\beta(c, 17) \geq \beta(17, 17) > 2^{31}$ for $c \geq
        17$) and $r \geq 18$. Then $\beta(c, r) = \prod_{i=1}^{c} (r + i) / c!$, whose
        geometric mean $g = ($`length`$\, c!)^{1/c}$ at the real root lies within
        $(c^2 - 1) / (24 (r + 1)) < 0.6$ below the arithmetic mean $r + (c + 1) / 2$;
        so $r$ is within a window of four integers from $\lfloor g - (c + 1) / 2
        \rfloor - 1$, counted exactly as above. The float estimate is checked at every
        boundary $\beta(c, r)$, $c \leq 16$, by the tests, in float32.
    """
    length = xp.asarray(length, dtype=xp.int32)
    c = xp.asarray(c, dtype=xp.int32)
    shape = xp.broadcast_shapes(xp.shape(length), xp.shape(c))
    length = xp.broadcast_to(length, shape)[..., None]
    c = xp.broadcast_to(c, shape)[..., None]
    cf = xp.clip(c, 2, _MAX_SMALL)
    log_fact = xp.asarray(_log_factorial())[cf]
    log_length = xp.log(xp.maximum(length, 1).astype(xp.float32))
    g = xp.exp((log_length + log_fact) / cf.astype(xp.float32))
    estimate = xp.floor(g - (cf + 1).astype(xp.float32) * 0.5).astype(xp.int32) - 1
    estimate = xp.clip(estimate, 0, _MAX_SQUARE)
    offsets = xp.arange(4, dtype=xp.int32).reshape((1,) * len(shape) + (4,))
    if bisect:
        # The probes reach r' = 30; those past 17 count as not below `length`.
        small = xp.zeros(shape + (1,), dtype=xp.int32)
        for half in (16, 8, 4, 2, 1):
            probe = small + (half - 1)
            below = beta_capped(c, xp.minimum(probe, 17), xp) < length
            small = small + xp.where((probe <= 17) & below, half, 0).astype(xp.int32)
        small = small[..., 0]
        short = beta_capped(c, estimate + offsets, xp) < length
        large = estimate[..., 0] + xp.sum(short, axis=-1, dtype=xp.int32)
    else:
        candidates = xp.concatenate(
            [
                xp.broadcast_to(xp.arange(18, dtype=xp.int32), shape + (18,)),
                estimate + offsets,
            ],
            axis=-1,
        )
        short = beta_capped(c, candidates, xp) < length
        # Both counts from one sum (one reduction in the compiled program): the first
        # 18 candidates count 1 each (at most 18), the other 4 count 32 each.
        weights = xp.asarray(np.where(np.arange(22) < 18, 1, 32).astype(np.int32))
        counts = xp.sum(xp.where(short, weights, 0), axis=-1, dtype=xp.int32)
        small = counts & 31
        large = estimate[..., 0] + (counts >> 5)
    return xp.where(small <= 17, small, large).astype(xp.int32)


def revolve_cost_capped(length, free_slots, cap: int, xp):
    """`min(revolve_cost(length, free_slots), cap)` elementwise on int32 arrays.

    `cap` is a Python int below `2**31`; `length >= 0`, `free_slots >= 0`.
    """
    length = xp.asarray(length, dtype=xp.int32)
    s = xp.asarray(free_slots, dtype=xp.int32)
    cap32 = xp.int32(cap)
    # No free slot: length * (length - 1) / 2, halving the even factor first.
    even = length % 2 == 0
    a = xp.where(even, length // 2, length)
    b = xp.where(even, length - 1, (length - 1) // 2)
    over = a > cap32 // xp.maximum(b, 1)
    quadratic = xp.where(over, cap32, xp.where(over, 0, a) * b)
    # Free slots: r * length - beta(s + 2, r - 1), where beta(s + 2, r - 1) <= r *
    # length.
    c = xp.maximum(s, 1) + 1
    # Elements priced by the quadratic formula search the shortest range instead.
    r = repetition_number(
        xp.where((s == 0) | (length <= 1), 1, length), c, xp, bisect=xp is np
    )
    over = r > cap32 // xp.maximum(length, 1)
    binomial = xp.where(
        over, cap32, xp.where(over, 0, r) * length - beta_capped(c + 1, r - 1, xp)
    )
    cost = xp.where(s == 0, quadratic, binomial)
    return xp.where(length <= 1, 0, xp.minimum(cost, cap32)).astype(xp.int32)


def revolve_split(length, free_slots, xp):
    r"""Where to store the next checkpoint when reversing a segment optimally.

    The segment starts at a stored state, has `length` steps and `free_slots` free
    slots. Advancing `j` steps, storing that state, reversing the `length - j` steps
    after it with `free_slots - 1` free slots and then the `j` steps before it with
    `free_slots` free slots costs `j + revolve_cost(length - j, free_slots - 1) +
    revolve_cost(j, free_slots)`, and the returned `j` makes this equal to
    `revolve_cost(length, free_slots)`.

    With $c$ = `free_slots + 1` and $r$ the repetition number of the segment, the
    optimal `j` are those for which the head $[0, j)$ needs at most $r - 1$ repetitions
    with $c$ checkpoints, $\beta(c, r - 2) \leq j \leq \beta(c, r - 1)$, and the tail at
    most $r$ repetitions with $c - 1$ checkpoints, $l - \beta(c - 1, r) \leq j \leq l -
    \beta(c - 1, r - 1)$: the cost is linear in `j` on that range (the identity
    $\beta(c, r - 1) + \beta(c + 1, r - 2) = \beta(c + 1, r - 1)$ gives the optimum).
    The smallest such `j` is returned.

    Written with operations of `xp` on int32 scalars, no Python control flow on values,
    so it runs eagerly (`xp = numpy`) and traced (`xp = jax.numpy`) alike. Valid for
    `length >= 2` and `free_slots >= 1`, `length` up to `2**31 - 1`; other inputs are
    clamped into that range (the result is then meaningless but finite and cheap to
    compute).

    **Arguments:**

    - `length`: the number of steps of the segment, an int32 scalar.
    - `free_slots`: the number of free checkpoint slots, an int32 scalar.
    - `xp`: `numpy` or `jax.numpy`.

    **Returns:**

    The offset `j`, `1 <= j <= length - 1`, of the next checkpoint, an int32 scalar.

    References: Griewank & Walther (2000), *Algorithm 799: Revolve* (full entries:
    docs/how-it-works.md, References).
    """
    if xp is np and np.ndim(length) == 0 and np.ndim(free_slots) == 0:
        # The eager replay asks for the same few splits over and over.
        return _revolve_split_numpy(int(length), int(free_slots))
    return _revolve_split(length, free_slots, xp)


def _revolve_split(length, free_slots, xp):
    length = xp.maximum(xp.asarray(length, dtype=xp.int32), 2)
    s = xp.maximum(xp.asarray(free_slots, dtype=xp.int32), 1)
    c = s + 1
    r = repetition_number(length, c, xp)
    lo = xp.maximum(beta_capped(c, r - 2, xp), length - beta_capped(s, r, xp))
    return xp.minimum(xp.maximum(lo, 1), length - 1)


@ft.lru_cache(maxsize=1 << 16)
def _revolve_split_numpy(length: int, free_slots: int) -> Any:
    return _revolve_split(np.int32(length), np.int32(free_slots), np)


def revolve_forward_slots(num_steps: int, checkpoints: int) -> np.ndarray:
    r"""The optimal forward sweep of a loop whose trip count is known up front.

    For each step `k = 1 .. num_steps`, the slot to store `x_k` into right after
    computing it, or -1: what the forward sweep does instead of asking the online rule.

    The forward sweep always runs to `x_n` (the loop's output), and then every stretch
    between stored states is reversed optimally with the slots free at that time (see
    `reverse.py`). This is revolve's first sweep over `n + 1` steps with the initial
    value as one more checkpoint: the state `x_n` is where revolve's last reverse step
    would start, and that reverse step is not needed (the cotangent of `x_n` is given).
    So the checkpoints are placed recursively at revolve's optimal split of the
    remaining stretch `[b, n + 1)` with the slots still free, `b_1 = revolve_split(n + 1,
    c)`, `b_2 = b_1 + revolve_split(n + 1 - b_1, c - 1)`, ..., until the slots run out or
    the split reaches `x_n` (which is never stored). Splitting `[0, n)` instead would
    spend a slot on `x_{n-1}` and cost up to `r - 1` more recomputations.

    With $c$ = `checkpoints` slots the backward sweep then recomputes exactly
    $R = t(n + 1, c + 1) - n$ states, where $t(l, s) = r l - \beta(s + 1, r - 1)$ is
    Griewank and Walther's minimal number of forward steps to reverse $l$ steps with $s$
    checkpoints ($r$ the smallest integer with $\beta(s, r) \geq l$); this is the
    fewest any schedule that stores at most $c$ states besides $x_0$ can recompute.
    Forward sweep, VJPs and recomputations together cost $n + t(n + 1, c + 1)$ body
    evaluations.

    **Arguments:**

    - `num_steps`: the trip count `n`, a non-negative Python int.
    - `checkpoints`: the number of slots `c`, a positive Python int.

    **Returns:**

    A read-only int32 NumPy array of length `num_steps`: entry `k - 1` is the slot for
    `x_k`, or -1. The slots used are `0, 1, ...` in the order they are filled.

    References: Griewank & Walther (2000), *Algorithm 799: Revolve* (full entries:
    docs/how-it-works.md, References).
    """
    return _revolve_forward_slots(int(num_steps), int(checkpoints))


@ft.lru_cache(maxsize=256)
def _revolve_forward_slots(num_steps: int, checkpoints: int) -> np.ndarray:
    table = np.full((num_steps,), -1, dtype=np.int32)
    start, slot = 0, 0
    while slot < checkpoints and num_steps - start >= 1:
        # The stretch [start, n + 1) has at least two steps and a free slot.
        start += int(
            revolve_split(np.int32(num_steps + 1 - start), checkpoints - slot, np)
        )
        if start >= num_steps:
            break
        table[start - 1] = slot
        slot += 1
    table.flags.writeable = False
    return table
