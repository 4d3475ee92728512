"""Write-once buffers: arrays in the loop carry that the body fills one index at a time.

Why a wrapper at all: a buffer is usually the biggest thing in the carry (the saved
trajectory of an ODE solve, the stacked outputs of a scan). The checkpointed kind must
not copy it into every checkpoint, and it can only avoid that if it knows which
leaves are buffers and that the body respects the *write-once, read-after-write*
contract: then the final buffer holds every value any step ever read, so one copy of
it serves every recomputation of the backward pass.

A `Buffer` records nothing beyond its array: writes lower to XLA's in-place
`dynamic_update_slice` / `scatter`, so a loop writing one row per step costs
O(row), not O(buffer), per step.
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool


class Buffer(eqx.Module):
    """What the body sees in place of each array selected by `buffers=`.

    Supports `buf[i]`, `buf.at[i].get()`, `buf.at[i].set(x, pred=...)` and the array
    attributes `.shape`, `.dtype`, `.ndim`, `.size`. Writing returns a new `Buffer`;
    return it in the carry as you would a `.at[].set` result.

    !!! danger "The buffer contract"

        Each index is written at most once per loop, and read only after it was
        written (in the same loop). loopax does not check this: a violation gives
        wrong gradients under `kind="checkpointed"`, because the backward pass replays
        steps against the *final* buffer.
    """

    _array: Array
    # Where writes may land: `None` (everywhere) or a boolean that is False for batch
    # elements of an enclosing loop that already finished. Loops set it so that a
    # finished element's buffer is frozen by masking each write (O(row)) instead of
    # selecting the whole buffer after every step (O(buffer)).
    _pred: Bool[Array, ""] | None = None

    @property
    def at(self) -> "_BufferIndexer":
        return _BufferIndexer(self)

    def __getitem__(self, item) -> Array:
        return self._array[item]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape

    @property
    def dtype(self):
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return self._array.ndim

    @property
    def size(self) -> int:
        return self._array.size


class _BufferIndexer:
    __slots__ = ("_buffer",)

    def __init__(self, buffer: Buffer):
        self._buffer = buffer

    def __getitem__(self, item) -> "_BufferRef":
        return _BufferRef(self._buffer, item)


class _BufferRef:
    __slots__ = ("_buffer", "_item")

    def __init__(self, buffer: Buffer, item):
        self._buffer = buffer
        self._item = item

    def get(self, **kwargs: Any) -> Array:
        return self._buffer._array.at[self._item].get(**kwargs)

    def set(
        self, x: ArrayLike, *, pred: Bool[ArrayLike, ""] = True, **kwargs: Any
    ) -> Buffer:
        buffer = self._buffer
        pred = and_pred(pred, buffer._pred)
        return Buffer(
            _masked_set(buffer._array, self._item, x, pred, **kwargs), buffer._pred
        )


def and_pred(a: Bool[ArrayLike, ""] | None, b: Bool[ArrayLike, ""] | None) -> Any:
    """`a & b`, where `True` and `None` mean "no mask" and fold away."""
    if a is None or a is True:
        return True if b is None else b
    if b is None or b is True:
        return a
    return jnp.logical_and(a, b)


def _masked_set(array: Array, item, x: ArrayLike, pred, **kwargs: Any) -> Array:
    if pred is not True:
        # Keep the old value where `pred` is False. Under `vmap` a batched `pred` masks
        # each batch element separately.
        old = array.at[item].get(**kwargs)
        x = jnp.where(pred, jnp.asarray(x, dtype=array.dtype), old)
    return array.at[item].set(x, **kwargs)


def buffer_at_set(
    buffer: Array | Buffer,
    item,
    x: ArrayLike,
    *,
    pred: Bool[ArrayLike, ""] = True,
    **kwargs: Any,
) -> Array | Buffer:
    """`buffer.at[item].set(x)` where `pred` is True, for `Buffer`s and arrays alike.

    Lets one body function run both inside a loop (where buffers are `Buffer`s) and
    outside it (where they are arrays).

    **Arguments:**

    - `buffer`: a `loopax.Buffer` or a JAX array.
    - `item`: the index to write.
    - `x`: the value to write.
    - `pred`: write only where this boolean is True (it may be traced or batched).
    - `**kwargs`: passed on to JAX's `.at[item].set(...)` (e.g. `mode=`).

    **Returns:**

    The updated buffer, of the same type as `buffer`.
    """
    if isinstance(buffer, Buffer):
        return buffer.at[item].set(x, pred=pred, **kwargs)
    return _masked_set(jnp.asarray(buffer), item, x, pred, **kwargs)
