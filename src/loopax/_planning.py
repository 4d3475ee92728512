"""The front end of the planning helpers: measure carries, then ask `_schedule/`.

`_schedule/` is pure integer policy and knows nothing of pytrees or buffers; this
module turns an example carry into the bytes of one checkpoint (`carry_bytes`) and
gives the public `loopax.schedule`, `loopax.Schedule`, `loopax.checkpoints_for_budget`
and `loopax.suggest_checkpoints` their pytree arguments.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from . import _schedule
from ._buffer import Buffer
from ._jax_internals import per_device_shape
from ._schedule.budget import checkpoints_for_bytes
from ._state import _select_buffer_leaves


def _leaf_bytes(leaf: Any) -> int:
    while isinstance(leaf, Buffer):
        leaf = leaf._array
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
        leaf = jnp.asarray(leaf)
    if _is_key(leaf):  # A typed PRNG key: count the bytes of its key data.
        data = jax.eval_shape(jax.random.key_data, leaf)
        itemsize = math.prod(data.shape[len(leaf.shape) :]) * data.dtype.itemsize
    else:
        itemsize = np.dtype(leaf.dtype).itemsize
    # Per device: a sharded leaf's checkpoint is split over its shards.
    return math.prod(per_device_shape(leaf)) * itemsize


def _is_key(leaf: Any) -> bool:
    return bool(jnp.issubdtype(leaf.dtype, jax.dtypes.extended))


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


class Schedule(_schedule.Schedule):
    __doc__ = _schedule.Schedule.__doc__

    def peak_memory(
        self, carry: Any, *, buffers: Callable[[Any], Any] | None = None
    ) -> int:
        """The bytes the checkpoints of this schedule take at their peak, for the
        example `carry`: `peak_slots_used` times the bytes of the carry's array leaves.

        **Arguments:**

        - `carry`: an example carry: a pytree of arrays, array-likes or
            `jax.ShapeDtypeStruct`s (only shapes and dtypes are read).
        - `buffers`: as for [`loopax.while_loop`][]: a function from the carry to its
            write-once arrays. Buffers are never stored in checkpoints, so they are
            excluded.

        **Returns:**

        An int, in bytes. It counts the stored carries only: not the buffers (kept
        once whatever the schedule), not the loop's 4-byte step counter per slot, not
        the body's own working memory. On the store-all path (`stores_residuals`)
        the slots hold each step's VJP residuals, which may be larger than the carry.
        """
        return int(self.peak_bytes(carry_bytes(carry, buffers)))


def schedule(
    num_steps: int,
    checkpoints: int,
    *,
    max_steps: int | None = None,
    known_length: bool = False,
) -> Schedule:
    plan = _schedule.schedule(
        num_steps, checkpoints, max_steps=max_steps, known_length=known_length
    )
    return Schedule(**{f: getattr(plan, f) for f in plan.__dataclass_fields__})


schedule.__doc__ = _schedule.schedule.__doc__


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
        the budget. With several devices the budget is *per device*: a leaf whose
        sharding is known at trace time (a committed array, an explicit mesh axis,
        or any value inside `shard_map`) counts the part one device holds, so a
        carry split over 8 devices fits 8 times the checkpoints; leaves sharded only
        by automatic propagation inside `jit` count whole.
    """
    nbytes = carry_bytes(init_val, buffers)
    if not isinstance(nbytes, int | np.integer):
        raise ValueError(
            "`memory_budget` needs the size of the carry at trace time, but the carry "
            f"has symbolic shapes (`jax.export`): its bytes are {nbytes}. Pass an "
            "int `checkpoints` instead of 'auto'."
        )
    return checkpoints_for_bytes(nbytes, memory_budget, max_steps=max_steps)


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
        ([`loopax.Schedule.recompute_factor`][]), found by bisection over the counts
        of [`loopax.schedule`][], starting from the smallest `c` that meets the
        target with the offline optimum (a closed form no placement beats), then
        doubling and bisecting (the factor does not increase with `c`, which the
        tests check over a grid). With `known_length=False` each step of the search
        fast-forwards the online rule: for a factor of 2, a search takes ~2.4 s
        at 10**6 steps and ~8 s at 10**7 (single-core CPU, 2026), and each of
        its steps ~2 minutes at 10**9 with ~2000 slots, so a search
        there takes many minutes (the rule at 1814 slots, the offline answer for a
        factor of 2, pays 2.0006);
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
    return _schedule.suggest_checkpoints(
        num_steps,
        max_recompute_factor=max_recompute_factor,
        memory_budget=memory_budget,
        checkpoint_bytes=None if carry is None else carry_bytes(carry, buffers),
        known_length=known_length,
    )
