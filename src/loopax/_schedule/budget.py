"""Memory budgets: how many checkpoints of a carry fit in a number of bytes.

A checkpoint holds one copy of the loop's carry without its buffers (buffers are never
stored; see `loopax.Buffer`). Its size is read from the shapes and dtypes of the
carry's leaves, so it works on concrete arrays, on tracers at trace time and on
`jax.ShapeDtypeStruct`s alike.
"""

import math
import operator
import re
from collections.abc import Callable
from typing import Any, SupportsIndex

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._buffer import Buffer
from .._state import _select_buffer_leaves


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


def _leaf_bytes(leaf: Any) -> int:
    while isinstance(leaf, Buffer):
        leaf = leaf._array
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        leaf = jnp.asarray(leaf)
    return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def carry_bytes(carry: Any, buffers: Callable[[Any], Any] | None = None) -> int:
    """The bytes of one checkpoint of `carry`: its array leaves, minus those that
    `buffers(carry)` selects.

    **Arguments:**

    - `carry`: a pytree of arrays, array-likes, tracers or `jax.ShapeDtypeStruct`s.
    - `buffers`: as for `loopax.while_loop`: a function from the carry to its
        write-once arrays, or `None`.

    **Returns:**

    An int: the sum over the non-buffer leaves of `size * itemsize`.
    """
    if buffers is not None and not callable(buffers):
        raise TypeError(
            "`buffers` must be None or a function from the carry to some of its "
            f"arrays, got {buffers!r}. Pass e.g. `buffers=lambda carry: carry[1]`."
        )
    leaves, treedef = jtu.tree_flatten(carry, is_leaf=lambda x: isinstance(x, Buffer))
    selected = (
        set()
        if buffers is None
        else _select_buffer_leaves(buffers, treedef, len(leaves))
    )
    return sum(_leaf_bytes(x) for i, x in enumerate(leaves) if i not in selected)


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


def checkpoints_for_budget(
    init_val: Any,
    memory_budget: int | str,
    *,
    buffers: Callable[[Any], Any] | None = None,
    max_steps: int | None = None,
) -> int:
    """The number of checkpoints `checkpoints="auto"` chooses for a memory budget.

    `loopax.while_loop(..., checkpoints="auto", memory_budget=...)` (and
    `loopax.scan`, `loopax.fori_loop`) call exactly this at trace time. With
    `max_steps`, if `max_steps` copies of the carry (buffers excluded) fit in
    `memory_budget` bytes, it is `max_steps`: the loop takes the store-all path (no
    recomputation, no controller). Otherwise it is the largest `c` such that `c`
    checkpoints fit, each counted as one copy of the carry plus the checkpointing
    controllers' working memory per slot (`CONTROLLER_BYTES_PER_SLOT` = 1024 bytes:
    the step held by each slot, the slot order, the online rule's temporaries), and
    at most `MAX_AUTO_CHECKPOINTS` = 4096 (the online rule's work per store grows with
    `c`, and more slots than that barely reduce recomputation). More checkpoints
    never cost more recomputation, so within these bounds this is the fastest
    gradient the budget allows.

    **Arguments:**

    - `init_val`: the initial carry (arrays, tracers or `jax.ShapeDtypeStruct`s);
        only shapes and dtypes are read.
    - `memory_budget`: bytes for the checkpoints: an int, or a string such as
        `"2GiB"`, `"512MB"` or `"1.5 GB"` (`KB`, `MB`, `GB`, `TB` are powers of 1000;
        `KiB`, `MiB`, `GiB`, `TiB` powers of 1024).
    - `buffers`: as for [`loopax.while_loop`][]: the carry's write-once arrays, which
        are never stored in checkpoints and so do not count.
    - `max_steps`: the loop's bound on the number of steps, or `None`.

    **Returns:**

    A positive int: `max(max_steps, 1)` if that many carries fit, else
    `min(memory_budget // (carry_bytes + 1024), 4096)`.

    **Raises:**

    `ValueError` if even one checkpoint does not fit, or if the carry has no bytes to
    store (everything is a buffer) and there is no `max_steps` to cap the count.

    !!! warning

        The budget counts the checkpoints and the controllers' working memory: not
        the buffers, not the working memory of the body or its VJP (the current
        state, its cotangent, the body's residuals: a few carries). On the store-all
        path (`c == max_steps`) each step's VJP residuals are stored instead of the
        carries (like `lax.scan`); they may be larger than the carry. Under `vmap`
        the carry is measured per batch element, so a batch of `B` needs `B` times
        the budget.
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
    per_checkpoint = carry_bytes(init_val, buffers)
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
