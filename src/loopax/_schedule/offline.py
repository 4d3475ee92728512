"""Offline (binomial) checkpointing: reversing a segment of known length.

Once the forward sweep has ended, the trip count is known and every stretch between two
stored states can be reversed optimally with Griewank and Walther's *revolve*. This
module holds the closed-form cost of that reversal and the rule that places the next
checkpoint.

The split rule is written once against an array namespace `xp` (either `numpy` or
`jax.numpy`) on int32 scalars, so that the very same code runs eagerly in
`loopax.schedule(...)` and traced inside the backward sweep of the compiled loop.

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
        doi = {10.1145/347837.347846},
    }
    ```
"""

import math
from collections.abc import Callable
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
    """The smallest `r >= 0` with `beta(c, r) >= length` (Python ints)."""
    r = 0
    b = 1  # beta(c, r)
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
        ```
    """
    if length <= 1:
        return 0
    if free_slots == 0:
        return length * (length - 1) // 2
    c = free_slots + 1
    r = _repetition_number(length, c)
    return r * length - beta(c + 1, r - 1)


#
# Array code shared by the eager replay (`xp = numpy`) and the traced loop (`xp = jnp`).
#


def while_loop(
    cond_fun: Callable[[Any], Any],
    body_fun: Callable[[Any], Any],
    init_val: Any,
    xp: Any,
) -> Any:
    """`jax.lax.while_loop` for `xp = jax.numpy`; a Python loop for `xp = numpy`."""
    if xp is np:
        val = init_val
        while cond_fun(val):
            val = body_fun(val)
        return val
    return lax.while_loop(cond_fun, body_fun, init_val)


def cond(
    pred: Any, true_fun: Callable, false_fun: Callable, operand: Any, xp: Any
) -> Any:
    """`jax.lax.cond` for `xp = jax.numpy`; a Python `if` for `xp = numpy`."""
    if xp is np:
        return true_fun(operand) if pred else false_fun(operand)
    return lax.cond(pred, true_fun, false_fun, operand)


def _mul_div_capped(b, a, i, xp):
    """`min(b * a // i, INT32_MAX)` for positive int32 `b`, `a`, `1 <= i <= 32`, where
    `i` divides `b * a`, without overflowing int32."""
    cap = xp.int32(INT32_MAX)
    q, rem = b // i, b % i
    qa, ra = a // i, a % i
    # b * a / i == q * a + rem * qa + rem * ra / i, the last term exact and below 32.
    over1 = q > cap // a
    term1 = xp.where(over1, 0, q) * a
    over2 = rem > cap // xp.maximum(qa, 1)
    term2 = xp.where(over2, 0, rem) * qa
    term3 = (rem * ra) // i
    over3 = term1 > cap - term2 - term3
    over = over1 | over2 | over3
    return xp.where(over, cap, xp.where(over, 0, term1) + term2 + term3)


def beta_capped(c, r, xp):
    r"""$\beta(c, r) = \binom{c + r}{c}$ on int32 scalars, capped at `2**31 - 1`.

    Zero for negative `r`. Builds $\binom{m + k}{k}$, $k = \min(c, r)$,
    $m = \max(c, r)$, one factor at a time and stops at the cap; since
    $\binom{m + i}{i} \geq 2^i$ that takes at most 32 iterations whatever `c` and `r`
    are. Works elementwise on arrays.
    """
    c = xp.asarray(c, dtype=xp.int32)
    r = xp.asarray(r, dtype=xp.int32)
    rr = xp.maximum(r, 0)
    k = xp.minimum(c, rr)
    m = xp.maximum(c, rr)
    cap = xp.int32(INT32_MAX)

    def cond_fun(val):
        i, b = val
        return xp.any((i < k) & (b < cap))

    def body_fun(val):
        i, b = val
        active = (i < k) & (b < cap)
        i = i + 1
        # Finished elements keep their value; `i` is clamped so the arithmetic stays
        # valid.
        b = xp.where(active, _mul_div_capped(b, m + i, xp.minimum(i, 32), xp), b)
        return i, b.astype(xp.int32)

    init = (xp.int32(0), xp.ones(xp.shape(k), dtype=xp.int32))
    _, b = while_loop(cond_fun, body_fun, init, xp)
    return xp.where(r < 0, xp.int32(0), b)


def repetition_number(length, c, xp):
    r"""The smallest $r \geq 0$ with $\beta(c, r) \geq$ `length`, on int32 scalars.

    Exponential search for an upper bound, then bisection: $O(\log r)$ binomials.
    Requires `c >= 2`; `length` may be any int32. Works elementwise on arrays.
    """
    length = xp.asarray(length, dtype=xp.int32)
    c = xp.asarray(c, dtype=xp.int32)

    def too_short(r):
        return beta_capped(c, r, xp) < length

    # Bracket: too_short(lo - 1) or lo == 0, and not too_short(hi).
    def grow_cond(val):
        _, hi = val
        return xp.any(too_short(hi))

    def grow_body(val):
        lo, hi = val
        short = too_short(hi)
        return xp.where(short, hi + 1, lo), xp.where(short, 2 * hi + 1, hi)

    shape = xp.shape(length + c)
    init = (xp.zeros(shape, dtype=xp.int32), xp.ones(shape, dtype=xp.int32))
    lo, hi = while_loop(grow_cond, grow_body, init, xp)

    def bisect_cond(val):
        lo, hi = val
        return xp.any(lo < hi)

    def bisect_body(val):
        lo, hi = val
        mid = lo + (hi - lo) // 2
        short = too_short(mid) & (lo < hi)
        return xp.where(short, mid + 1, lo), xp.where(short | (lo >= hi), hi, mid)

    r, _ = while_loop(bisect_cond, bisect_body, (lo, hi), xp)
    return r


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
    r = repetition_number(xp.where((s == 0) | (length <= 1), 1, length), c, xp)
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
        ```
    """
    length = xp.maximum(xp.asarray(length, dtype=xp.int32), 2)
    s = xp.maximum(xp.asarray(free_slots, dtype=xp.int32), 1)
    c = s + 1
    r = repetition_number(length, c, xp)
    lo = xp.maximum(beta_capped(c, r - 2, xp), length - beta_capped(s, r, xp))
    return xp.minimum(xp.maximum(lo, 1), length - 1)
