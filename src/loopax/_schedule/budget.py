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


def checkpoints_for_budget(
    init_val: Any,
    memory_budget: int | str,
    *,
    buffers: Callable[[Any], Any] | None = None,
    max_steps: int | None = None,
) -> int:
    """The number of checkpoints `checkpoints="auto"` chooses for a memory budget.

    `loopax.while_loop(..., checkpoints="auto", memory_budget=...)` (and
    `loopax.scan`, `loopax.fori_loop`) call exactly this at trace time: the largest
    `c` such that `c` copies of the carry, buffers excluded, fit in `memory_budget`
    bytes. More checkpoints never cost more recomputation, so this is the fastest
    gradient the budget allows. With `max_steps`, `c` is capped at `max_steps`: a
    loop that can store every step takes the store-all path (no recomputation).

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

    A positive int: `memory_budget // carry_bytes`, at most `max(max_steps, 1)`.

    **Raises:**

    `ValueError` if even one checkpoint does not fit, or if the carry has no bytes to
    store (everything is a buffer) and there is no `max_steps` to cap the count.

    !!! warning

        The budget counts the checkpoints only: not the buffers, not the loop's 4-byte
        step counter per slot, not the working memory of the body or its VJP. On the
        store-all path (`c == max_steps`) each step's VJP residuals are stored instead
        of the carries (like `lax.scan`); they may be larger than the carry. Under
        `vmap` the carry is measured per batch element, so a batch of `B` needs `B`
        times the budget. Without `max_steps`, a small carry and a large budget give
        many checkpoints, and the forward sweep's placement rule costs $O(c \\log c)$
        integer work per step: pass `max_steps` when you can.
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
    count = budget // per_checkpoint
    if count < 1:
        raise ValueError(
            f"`memory_budget` of {budget} bytes ({format_bytes(budget)}) cannot hold "
            f"even one checkpoint: one copy of the carry (buffers excluded) takes "
            f"{per_checkpoint} bytes ({format_bytes(per_checkpoint)}). Raise "
            "`memory_budget`, declare large write-once arrays with `buffers=`, or "
            "use kind='lax' if you need no reverse mode."
        )
    if max_steps is not None:
        count = min(count, max(max_steps, 1))
    return count
