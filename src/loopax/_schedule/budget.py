"""Memory budgets: how many checkpoints of a given size fit in a number of bytes.

A checkpoint holds one copy of the loop's carry without its buffers. Measuring the
carry is the front end's job (`loopax._planning.carry_bytes`); here everything is a
number of bytes.
"""

import operator
import re
from typing import Any, SupportsIndex


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_BUDGET = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_BUDGET_HINT = (
    'Pass a positive number of bytes (an int), or a string such as "2GiB", "512MB" '
    'or "1.5 GB" (units B, KB, MB, GB, TB in powers of 1000; KiB, MiB, GiB, TiB in '
    "powers of 1024)."
)


def parse_memory_budget(memory_budget: Any) -> int:
    """`memory_budget` as a positive number of bytes.

    Accepts an int, or a string: a number followed by an optional unit, `B`, `KB`,
    `MB`, `GB`, `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024),
    case-insensitively, e.g. `"2GiB"`, `"512MB"`, `"1.5 GB"`. Fractions of a byte are
    rounded down.
    """
    if isinstance(memory_budget, str):
        match = _BUDGET.match(memory_budget)
        unit = None if match is None else _UNITS.get(match.group(2).lower())
        if match is None or unit is None:
            raise ValueError(
                f"`memory_budget` must be a number of bytes, got {memory_budget!r}. "
                + _BUDGET_HINT
            )
        value = int(float(match.group(1)) * unit)
    elif isinstance(memory_budget, bool) or not isinstance(
        memory_budget, SupportsIndex
    ):
        raise TypeError(
            f"`memory_budget` must be an int or a string, got {memory_budget!r}. "
            + _BUDGET_HINT
        )
    else:
        value = operator.index(memory_budget)
    if value <= 0:
        raise ValueError(
            f"`memory_budget` must be positive, got {memory_budget!r}. " + _BUDGET_HINT
        )
    return value


def format_bytes(num_bytes: int) -> str:
    """`num_bytes` in the largest binary unit that keeps it >= 1, e.g. `1.5 MiB`."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{num_bytes} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"


def default_checkpoints(max_steps: int) -> int:
    """`checkpoints` when only `max_steps` is given: `max(1, ceil(log2(max_steps + 1)))`.

    Logarithmic memory keeps the repetition number small: with c slots a loop of up to
    C(c + r, c) steps is reversed with each step recomputed at most r times
    (Griewank & Walther 2000), and C(c + r, c) >= 2**c - 1 for r >= c.
    """
    return max(1, (max_steps).bit_length())


# The checkpointing controllers' working memory per slot, besides the stored carry:
# the step held by each slot and the slot order (int32 each) and the temporaries of
# the online rule's plan (`online_plan`, rebuilt at each store) and of the reverse
# controller. Measured at about 620 bytes per slot (an 8-byte carry, 4096 to 16384
# slots, jax 0.10.2 on CPU: `memory_analysis().temp_size_in_bytes` of the gradient);
# rounded up.
CONTROLLER_BYTES_PER_SLOT = 1024
# The most checkpoints `checkpoints="auto"` chooses when it cannot store every step:
# the online rule does O(c) work per store, and beyond a few thousand slots more
# barely reduce recomputation (4096 slots reverse 10**9 steps with at most 3
# recomputations of each).
MAX_AUTO_CHECKPOINTS = 4096


def checkpoints_for_bytes(
    checkpoint_bytes: int, memory_budget: int | str, *, max_steps: int | None = None
) -> int:
    """`loopax.checkpoints_for_budget` on numbers: the checkpoints of
    `checkpoint_bytes` bytes each (one carry, buffers excluded; the front end
    measures it) that `checkpoints="auto"` chooses for `memory_budget`. See
    `loopax.checkpoints_for_budget` for the rule.
    """
    budget = parse_memory_budget(memory_budget)
    if max_steps is not None:
        if isinstance(max_steps, bool) or not isinstance(max_steps, SupportsIndex):
            raise TypeError(
                f"`max_steps` must be a non-negative integer or None, got {max_steps!r}."
            )
        max_steps = operator.index(max_steps)
        if max_steps < 0:
            raise ValueError(
                f"`max_steps` must be a non-negative integer or None, got {max_steps}."
            )
    per_checkpoint = checkpoint_bytes
    if per_checkpoint == 0:
        if max_steps is None:
            raise ValueError(
                "`memory_budget` cannot choose `checkpoints`: the carry holds no bytes "
                "besides its buffers, so any number of checkpoints fits. Pass "
                "`checkpoints=` explicitly, or `max_steps=` to store every step."
            )
        return max(max_steps, 1)
    if max_steps is not None and budget // per_checkpoint >= max(max_steps, 1):
        return max(max_steps, 1)  # Store-all: no controller, no recomputation.
    count = min(
        budget // (per_checkpoint + CONTROLLER_BYTES_PER_SLOT), MAX_AUTO_CHECKPOINTS
    )
    if count < 1:
        raise ValueError(
            f"`memory_budget` of {budget} bytes ({format_bytes(budget)}) cannot hold "
            f"even one checkpoint: one copy of the carry (buffers excluded) takes "
            f"{per_checkpoint} bytes ({format_bytes(per_checkpoint)}), plus "
            f"{CONTROLLER_BYTES_PER_SLOT} bytes of working memory per checkpoint. Raise "
            "`memory_budget`, declare large write-once arrays with `buffers=`, or "
            "use kind='lax' if you need no reverse mode."
        )
    return count
