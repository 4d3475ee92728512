"""`loopax.suggest_checkpoints`: pick `checkpoints` from a recompute target or a budget."""

import numbers
from collections.abc import Callable
from typing import Any

from .budget import carry_bytes, checkpoints_for_budget, format_bytes
from .replay import _check_int, schedule


def _recompute_factor(num_steps: int, checkpoints: int, known_length: bool) -> float:
    return schedule(num_steps, checkpoints, known_length=known_length).recompute_factor


def suggest_checkpoints(
    num_steps: int,
    *,
    max_recompute_factor: float | None = None,
    memory_budget: int | str | None = None,
    carry: Any = None,
    buffers: Callable[[Any], Any] | None = None,
    known_length: bool = False,
) -> int:
    """Suggest `checkpoints` for a loop of `num_steps` steps.

    Say how much slower than the cheapest gradient you accept, how much memory the
    checkpoints may take, or both:

    - with `max_recompute_factor`: the *smallest* `c` whose gradient evaluates the
        body at most `max_recompute_factor * 2 * num_steps` times
        ([`loopax.Schedule.recompute_factor`][]), found by bisection over the exact
        replay [`loopax.schedule`][] (doubling `c` from 1, then bisecting: the
        factor does not increase with `c`, which the tests check over a grid);
    - with `memory_budget` and `carry`: the *largest* `c` whose checkpoints fit, as
        [`loopax.checkpoints_for_budget`][], but at most `max(num_steps - 1, 1)`,
        which already recomputes nothing;
    - with both: the smallest `c` meeting the recompute target, provided it fits the
        budget (a `ValueError` says how far apart they are if not).

    **Arguments:**

    - `num_steps`: the (expected) number of steps, a non-negative int.
    - `max_recompute_factor`: the largest acceptable total body evaluations divided by
        `2 * num_steps`, a number >= 1 (1: no recomputation at all).
    - `memory_budget`: bytes for the checkpoints, an int or a string like `"2GiB"`;
        needs `carry`.
    - `carry`: an example carry (arrays or `jax.ShapeDtypeStruct`s) to size the
        checkpoints with; only with `memory_budget`.
    - `buffers`: the carry's write-once arrays, as for [`loopax.while_loop`][]; they
        are not stored in checkpoints.
    - `known_length`: as for [`loopax.schedule`][]: True for `loopax.scan` and
        `loopax.fori_loop` with static bounds (revolve placement), False (default)
        for `loopax.while_loop`.

    **Returns:**

    A positive int to pass as `checkpoints=`.
    """
    num_steps = _check_int("num_steps", num_steps, 0)
    if not isinstance(known_length, bool):
        raise TypeError(f"`known_length` must be a bool, got {known_length!r}.")
    if max_recompute_factor is None and memory_budget is None:
        raise ValueError(
            "`suggest_checkpoints` needs a target: pass `max_recompute_factor=` "
            "(e.g. 2.0), or `memory_budget=` with `carry=`, or both."
        )
    if memory_budget is not None and carry is None:
        raise ValueError(
            "`memory_budget` needs `carry=`: an example carry (arrays or "
            "`jax.ShapeDtypeStruct`s) to measure one checkpoint with."
        )
    if memory_budget is None and (carry is not None or buffers is not None):
        raise ValueError(
            "`carry` and `buffers` are only used with `memory_budget`: pass "
            "`memory_budget=` too, or drop them."
        )
    most_useful = max(num_steps - 1, 1)  # Recomputes nothing.
    largest = most_useful
    if memory_budget is not None:
        largest = checkpoints_for_budget(
            carry, memory_budget, buffers=buffers, max_steps=most_useful
        )
    if max_recompute_factor is None:
        return largest
    if isinstance(max_recompute_factor, bool) or not isinstance(
        max_recompute_factor, numbers.Real
    ):
        raise TypeError(
            "`max_recompute_factor` must be a number >= 1, got "
            f"{max_recompute_factor!r}."
        )
    if not max_recompute_factor >= 1:
        raise ValueError(
            f"`max_recompute_factor` must be >= 1, got {max_recompute_factor!r}: a "
            "gradient evaluates the body at least `2 * num_steps` times (forward and "
            "VJP), which is a factor of 1."
        )
    # Smallest c in [1, most_useful] with factor(c) <= target; factor(most_useful) is
    # 1, so one exists. Gallop up from 1 (small counts replay fastest), then bisect.
    lo, hi = 1, 1
    while hi < most_useful and (
        _recompute_factor(num_steps, hi, known_length) > max_recompute_factor
    ):
        lo, hi = hi + 1, min(2 * hi, most_useful)
    while lo < hi:
        mid = (lo + hi) // 2
        if _recompute_factor(num_steps, mid, known_length) <= max_recompute_factor:
            hi = mid
        else:
            lo = mid + 1
    smallest = lo
    if smallest > largest:
        assert carry is not None
        per_checkpoint = carry_bytes(carry, buffers)
        raise ValueError(
            f"`max_recompute_factor={max_recompute_factor}` and `memory_budget="
            f"{memory_budget!r}` contradict each other: {num_steps} steps need at "
            f"least {smallest} checkpoints for that factor "
            f"({format_bytes(smallest * per_checkpoint)}), but the budget holds only "
            f"{largest} ({format_bytes(largest * per_checkpoint)}, recompute factor "
            f"{_recompute_factor(num_steps, largest, known_length):.3f}). Raise the "
            "budget or accept more recomputation."
        )
    return smallest
