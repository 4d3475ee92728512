"""`loopax.suggest_checkpoints`: pick `checkpoints` from a recompute target or a budget
(in bytes: the front end, `loopax._planning`, measures the carry)."""

import numbers

from .budget import checkpoints_for_bytes, format_bytes
from .counts import schedule_counts
from .offline import revolve_cost
from .replay import _check_int


def _recompute_factor(num_steps: int, checkpoints: int, known_length: bool) -> float:
    if num_steps == 0:
        return 1.0
    if known_length:  # t(n + 1, c + 1) - n, closed form.
        recomputed = revolve_cost(num_steps + 1, checkpoints) - num_steps
    else:
        counts = schedule_counts(
            num_steps, checkpoints, known_length=False, store_all=False
        )
        recomputed = counts.num_recomputed
    return (2 * num_steps + recomputed) / (2 * num_steps)


def suggest_checkpoints(
    num_steps: int,
    *,
    max_recompute_factor: float | None = None,
    memory_budget: int | str | None = None,
    checkpoint_bytes: int | None = None,
    known_length: bool = False,
) -> int:
    """`loopax.suggest_checkpoints` (documented there, in `loopax._planning`) on
    numbers: the front end has measured one checkpoint's bytes (`checkpoint_bytes`,
    given with `memory_budget`). Returns a positive int to pass as `checkpoints=`."""
    num_steps = _check_int("num_steps", num_steps, 0)
    if not isinstance(known_length, bool):
        raise TypeError(f"`known_length` must be a bool, got {known_length!r}.")
    if max_recompute_factor is None and memory_budget is None:
        raise ValueError(
            "`suggest_checkpoints` needs a target: pass `max_recompute_factor=` "
            "(e.g. 2.0), or `memory_budget=` with `carry=`, or both."
        )
    if (memory_budget is None) != (checkpoint_bytes is None):
        raise AssertionError(
            "loopax internal error: `memory_budget` and `checkpoint_bytes` go "
            "together; please report a bug."
        )
    most_useful = max(num_steps - 1, 1)  # Recomputes nothing.
    largest = most_useful
    if memory_budget is not None:
        assert checkpoint_bytes is not None
        largest = checkpoints_for_bytes(
            checkpoint_bytes, memory_budget, max_steps=most_useful
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
    # 1, so one exists. The offline optimum (closed form, non-increasing in c) gives
    # a lower bound by bisection; then gallop up from it and bisect.
    lo, hi = 1, most_useful
    while lo < hi:
        mid = (lo + hi) // 2
        if _recompute_factor(num_steps, mid, True) <= max_recompute_factor:
            hi = mid
        else:
            lo = mid + 1
    if known_length:
        hi = lo
    else:
        step = 1
        hi = lo
        while hi < most_useful and (
            _recompute_factor(num_steps, hi, known_length) > max_recompute_factor
        ):
            lo, hi = hi + 1, min(hi + step, most_useful)
            step *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if _recompute_factor(num_steps, mid, known_length) <= max_recompute_factor:
            hi = mid
        else:
            lo = mid + 1
    smallest = lo
    if smallest > largest:
        assert checkpoint_bytes is not None
        per_checkpoint = checkpoint_bytes
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
