"""Exact sums of the online rule's prices on int32 arrays, in two limbs.

The online rule (`online.py`) prices each option as a sum of up to `2 c + 4` revolve
costs, each capped at `rule_cap(c)`. Those sums pass `2**31` on long loops, and the
compiled rule has int32 only (JAX without x64), so a sum is held as two int32 limbs,
`hi * 2**bits + lo` with `0 <= lo < 2**bits`: the low `bits` bits of every term are
summed apart from the rest, and neither partial sum can overflow. The same code runs
eagerly (`xp = numpy`) and traced (`xp = jax.numpy`), so the replay in
`loopax.schedule` and the compiled loop agree exactly.

Until session 9 the rule capped each term at `(2**31 - 1) // (2 c + 4)` so that plain
int32 sums could not overflow: 1.07e6 at c = 1000. On long loops the first stretch's
cost reached that cap and the rule degenerated (every later step stored, one wasted
forward sweep: recompute factor 2.47 against 1.97 at 10**7 steps, c = 1000).
"""

from typing import Any, NamedTuple

import numpy as np
from jax import lax

from .offline import INT32_MAX


# The largest cap: a difference of two prices clamped to `cap + 1` (`relative`) is
# then at most `2**31 - 1`, and the compiled rule adds one more term to it with
# saturation (`online.online_decide`).
_TERM_LIMIT = INT32_MAX - 1


def _terms(checkpoints: int) -> int:
    """The most capped costs one price of the online rule sums."""
    return 2 * checkpoints + 4


def limb_bits(checkpoints: int) -> int:
    """The width of the low limb: the sum of `_terms` low limbs fits in int32
    (15 bits up to 32 765 slots, fewer past that)."""
    return min(15, (INT32_MAX // _terms(checkpoints)).bit_length() - 1)


def rule_cap(checkpoints: int) -> int:
    """The cap on each revolve cost the online rule adds up: `2**31 - 2` up to
    16 381 slots; past that, low enough that the sum of the high limbs fits too."""
    high = INT32_MAX // _terms(checkpoints)
    return min(_TERM_LIMIT, high << limb_bits(checkpoints))


class Wide(NamedTuple):
    """A sum `hi * 2**bits + lo` as two int32 arrays; normalized when `0 <= lo <
    2**bits` (`add` and `sub` leave that to the comparisons: fewer operations to
    compile)."""

    hi: Any
    lo: Any


def _normalize(hi, lo, bits: int, xp) -> Wide:
    """The carry of `lo` moved into `hi` (shifts floor: right for negative `lo`)."""
    return Wide(
        (hi + (lo >> bits)).astype(xp.int32),
        (lo & ((1 << bits) - 1)).astype(xp.int32),
    )


def normalize(a: Wide, bits: int, xp) -> Wide:
    """`a` with `0 <= lo < 2**bits`."""
    return _normalize(a.hi, a.lo, bits, xp)


def split(x, bits: int, xp) -> Wide:
    """An int32 array as a `Wide`."""
    x = xp.asarray(x, dtype=xp.int32)
    return _normalize(xp.zeros_like(x), x, bits, xp)


def add(first: Wide, *rest: Wide) -> Wide:
    """The sum, not normalized (each limb has room for a few carries)."""
    hi, lo = first
    for part in rest:
        hi, lo = hi + part.hi, lo + part.lo
    return Wide(hi, lo)


def sub(a: Wide, b: Wide) -> Wide:
    """The difference, not normalized."""
    return Wide(a.hi - b.hi, a.lo - b.lo)


def cumsum(costs, bits: int, xp, *, reverse: bool = False) -> Wide:
    """The running sums of non-negative costs below `rule_cap` along the last axis
    (from the end with `reverse`). Both limbs in one prefix sum: compiled, each is
    a kernel of its own, and XLA:CPU's compile time grows with the kernels."""
    costs = xp.asarray(costs, dtype=xp.int32)
    if reverse:
        costs = costs[..., ::-1]
    limbs = xp.stack([costs >> bits, costs & ((1 << bits) - 1)])
    hi, lo = xp.cumsum(limbs, axis=-1, dtype=xp.int32)
    if reverse:
        hi, lo = hi[..., ::-1], lo[..., ::-1]
    return _normalize(hi, lo, bits, xp)


def take(a: Wide, index) -> Wide:
    """Entries of the last axis (any basic or advanced index)."""
    return Wide(a.hi[..., index], a.lo[..., index])


def concatenate(parts: list[Wide], xp) -> Wide:
    return Wide(
        xp.concatenate([p.hi for p in parts], axis=-1),
        xp.concatenate([p.lo for p in parts], axis=-1),
    )


def argmin(a: Wide, bits: int, xp):
    """The index of the first minimum along the last axis. Compiled, one reduction
    over (hi, lo, index), as `jnp.argmin` is one over (value, index)."""
    a = _normalize(*a, bits, xp)
    if xp is np:
        low = np.min(a.hi, axis=-1, keepdims=True)
        return np.argmin(np.where(a.hi == low, a.lo, 1 << bits), axis=-1).astype(
            np.int32
        )
    axis = a.hi.ndim - 1
    index = lax.broadcasted_iota(np.int32, a.hi.shape, axis)

    def first_least(x, y):
        take_y = (y[0] < x[0]) | (
            (y[0] == x[0]) & ((y[1] < x[1]) | ((y[1] == x[1]) & (y[2] < x[2])))
        )
        return tuple(xp.where(take_y, v, u) for u, v in zip(x, y, strict=True))

    none = np.int32(INT32_MAX)
    return lax.reduce((a.hi, a.lo, index), (none, none, none), first_least, (axis,))[2]


def less(a: Wide, b: Wide, bits: int, xp):
    """`a < b`, limb by limb once both are normalized (no difference is taken: `b`
    may be a sentinel with `hi = 2**31 - 1`)."""
    a, b = _normalize(*a, bits, xp), _normalize(*b, bits, xp)
    return (a.hi < b.hi) | ((a.hi == b.hi) & (a.lo < b.lo))


def where(pred, a: Wide, b: Wide, xp) -> Wide:
    return Wide(xp.where(pred, a.hi, b.hi), xp.where(pred, a.lo, b.lo))


def minimum(a: Wide, b: Wide, bits: int, xp) -> Wide:
    return where(~less(b, a, bits, xp), a, b, xp)


def relative(a: Wide, base: Wide, cap: int, bits: int, xp):
    """`min(a - base, cap + 1)` as int32, for `a >= base`.

    Adding one more term `<= cap` to each option, saturating at `2**31 - 1`, then
    keeps every decision the exact sums would make, if `base` is the least of
    their constant parts: the base option's total is at most `cap < 2**31 - 1`, so
    the cheapest option is never clamped nor saturated, and an option that is
    loses to the base option, before and after.
    """
    d = _normalize(a.hi - base.hi, a.lo - base.lo, bits, xp)
    limit = 1 << (31 - bits)  # d.hi below it: d.hi * 2**bits + d.lo < 2**31
    exact = (xp.minimum(d.hi, limit - 1) << bits) + d.lo
    return xp.where(d.hi >= limit, cap + 1, xp.minimum(exact, cap + 1)).astype(xp.int32)
