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

from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool

from ._check_buffers import checked_get, checked_value
from ._jax_internals import (
    ClosedJaxpr,
    define_primitive,
    eqn_with_params,
    instantiate_zeros,
    is_undefined_primal,
    is_zero,
    map_eqns,
)


NOT_AN_ARRAY = (
    "`buffers=` selected `{name}` as a buffer, so inside the loop it is a "
    "`loopax.Buffer`, which cannot be used in {operation}. A buffer supports only "
    "`buf[i]`, `buf.at[i].get()`, `buf.at[i].set(x, pred=...)` and `.shape`, "
    "`.dtype`, `.ndim`, `.size`. Read entries by index (`buf[i]`); or, if this value "
    "is not filled in one entry at a time (a step counter, the state), do not select "
    "it in `buffers=`."
)


def _not_an_array(operation: str) -> Callable[..., NoReturn]:
    """A method of `Buffer` that raises `NOT_AN_ARRAY` for `operation`."""

    def method(self: "Buffer", *args: Any, **kwargs: Any) -> NoReturn:
        del args, kwargs
        raise TypeError(
            NOT_AN_ARRAY.format(name=self._path or "<buffer>", operation=operation)
        )

    return method


class Buffer(eqx.Module):
    """What the body sees in place of each array selected by `buffers=`.

    Supports `buf[i]`, `buf.at[i].get()`, `buf.at[i].set(x, pred=...)` and the array
    attributes `.shape`, `.dtype`, `.ndim`, `.size`. Writing returns a new `Buffer`;
    return it in the carry as you would a `.at[].set` result.

    !!! danger "The buffer contract"

        Each index is written at most once per loop, and read only after it was
        written (in the same loop). loopax does not check this by default: a
        violation gives wrong gradients under `kind="checkpointed"`, because the
        backward pass replays steps against the *final* buffer. Pass
        `check_buffers=True` to the loop to check it at run time while debugging.
    """

    _array: Array
    # Where writes may land: `None` (everywhere) or a boolean that is False for batch
    # elements of an enclosing loop that already finished. Loops set it so that a
    # finished element's buffer is frozen by masking each write (O(row)) instead of
    # selecting the whole buffer after every step (O(buffer)).
    _pred: Bool[Array, ""] | None = None
    # With `check_buffers=True` only (see `_check_buffers.py`): which entries this loop
    # has written (same shape as `_array`), and the buffer's name for error messages.
    # `None` otherwise, and then every access takes the unchecked path.
    _written: Bool[Array, "..."] | None = None
    _name: str | None = eqx.field(static=True, default=None)
    # Where `buffers=` found this leaf (e.g. `init_val['ys']`), for error messages.
    _path: str | None = eqx.field(static=True, default=None)

    @property
    def at(self) -> "_BufferIndexer":
        return _BufferIndexer(self)

    def __getitem__(self, item) -> Array:
        if self._written is not None:
            return self.at[item].get()
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

    # Everything else an array does is a mistake here (most often `buffers=` selected
    # the wrong leaf, e.g. the step counter): say so, instead of failing deep inside
    # JAX with "'<' not supported between instances of 'Buffer' and 'int'".
    __array__ = _not_an_array("a conversion to a NumPy array (`__array__`)")
    __jax_array__ = _not_an_array(
        "a `jax.numpy` function or a conversion to a JAX array (`__jax_array__`)"
    )
    __bool__ = _not_an_array("a truth test (`if`, `and`, `or`)")
    __int__ = _not_an_array("`int(...)`")
    __float__ = _not_an_array("`float(...)`")
    __complex__ = _not_an_array("`complex(...)`")
    __index__ = _not_an_array("an index (`__index__`)")
    __iter__ = _not_an_array("iteration (`for ... in`)")
    __len__ = _not_an_array("`len(...)`")
    __eq__ = _not_an_array("a comparison (`==`)")  # pyright: ignore[reportIncompatibleMethodOverride]
    __ne__ = _not_an_array("a comparison (`!=`)")  # pyright: ignore[reportIncompatibleMethodOverride]
    __hash__ = object.__hash__
    __lt__ = _not_an_array("a comparison (`<`)")
    __le__ = _not_an_array("a comparison (`<=`)")
    __gt__ = _not_an_array("a comparison (`>`)")
    __ge__ = _not_an_array("a comparison (`>=`)")
    __neg__ = _not_an_array("arithmetic (`-x`)")
    __pos__ = _not_an_array("arithmetic (`+x`)")
    __abs__ = _not_an_array("`abs(...)`")
    __invert__ = _not_an_array("`~`")
    __add__ = __radd__ = _not_an_array("arithmetic (`+`)")
    __sub__ = __rsub__ = _not_an_array("arithmetic (`-`)")
    __mul__ = __rmul__ = _not_an_array("arithmetic (`*`)")
    __truediv__ = __rtruediv__ = _not_an_array("arithmetic (`/`)")
    __floordiv__ = __rfloordiv__ = _not_an_array("arithmetic (`//`)")
    __mod__ = __rmod__ = _not_an_array("arithmetic (`%`)")
    __pow__ = __rpow__ = _not_an_array("arithmetic (`**`)")
    __matmul__ = __rmatmul__ = _not_an_array("a matrix product (`@`)")
    __and__ = __rand__ = _not_an_array("`&`")
    __or__ = __ror__ = _not_an_array("`|`")
    __xor__ = __rxor__ = _not_an_array("`^`")
    __lshift__ = __rlshift__ = _not_an_array("`<<`")
    __rshift__ = __rrshift__ = _not_an_array("`>>`")


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
        buffer = self._buffer
        if buffer._written is not None:
            return checked_get(
                buffer._array,
                buffer._written,
                buffer._name or "<buffer>",
                True if buffer._pred is None else buffer._pred,
                self._item,
                kwargs,
            )
        return buffer._array.at[self._item].get(**kwargs)

    def set(
        self, x: ArrayLike, *, pred: Bool[ArrayLike, ""] = True, **kwargs: Any
    ) -> Buffer:
        buffer = self._buffer
        pred = and_pred(pred, buffer._pred)
        if buffer._written is not None:
            return _checked_set(buffer, self._item, x, pred, kwargs)
        return Buffer(
            _masked_set(buffer._array, self._item, x, pred, **kwargs),
            buffer._pred,
            _path=buffer._path,
        )


def _checked_set(buffer: Buffer, item, x: ArrayLike, pred, kwargs: dict) -> Buffer:
    """A write under `check_buffers=True`: check it, then mark the entries written."""
    assert buffer._written is not None
    x = checked_value(
        buffer._array,
        buffer._written,
        buffer._name or "<buffer>",
        pred,
        item,
        x,
        kwargs,
    )
    return Buffer(
        _masked_set(buffer._array, item, x, pred, **kwargs),
        buffer._pred,
        _masked_set(buffer._written, item, True, pred, **kwargs),
        buffer._name,
        buffer._path,
    )


def and_pred(a: Bool[ArrayLike, ""] | None, b: Bool[ArrayLike, ""] | None) -> Any:
    """`a & b`, where `True` and `None` mean "no mask" and fold away."""
    if a is None or a is True:
        return True if b is None else b
    if b is None or b is True:
        return a
    return jnp.logical_and(a, b)


def _masked_set(array: Array, item, x: ArrayLike, pred, **kwargs: Any) -> Array:
    index = _integer_index(array, item)
    if not kwargs and index is not None:
        shape = array.shape[len(index) :]
        x = jnp.broadcast_to(jnp.asarray(x, dtype=array.dtype), shape)
        return _write_entries(array, x, jnp.asarray(pred, dtype=bool), *index)
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


# -- writes whose transpose may leave the written entries of the cotangent alone --------
#
# Transposing `buffer.at[i].set(x)` gives `x` the cotangent's entry `i` and the buffer
# before the write the cotangent with entry `i` zeroed. In a loop's backward sweep that
# zeroing is an in-place update of a carried, buffer-sized cotangent right after a read
# of it, and XLA:CPU then copies the whole cotangent, twice, every step: O(n * size) per
# gradient. Under the buffer contract (each entry written once, read only after) the
# zeroed entry is read by no earlier step; it matters only for the cotangent of the
# buffer's value *before the loop*. So the checkpointed backward sweep, when nobody
# asks for that cotangent, marks the writes of the step body that go straight into the
# loop's carried buffers `read_once=True` (`mark_read_once`), and their transpose
# skips the zeroing; every other write keeps the exact transpose.


def _integer_index(array: Array, item) -> tuple | None:
    """`item` as a tuple of integer scalars (one per leading axis), or `None` when it
    is anything else (slices, arrays of indices, ...), which takes the plain path."""
    index = item if isinstance(item, tuple) else (item,)
    if not 0 < len(index) <= array.ndim:
        return None
    out = []
    for i in index:
        integer_scalar = isinstance(i, int) or (
            hasattr(i, "dtype")
            and hasattr(i, "shape")
            and i.shape == ()
            and jnp.issubdtype(i.dtype, jnp.integer)
        )
        if isinstance(i, bool) or not integer_scalar:
            return None
        out.append(jnp.asarray(i))
    if not jnp.issubdtype(array.dtype, jnp.inexact):
        return None  # No cotangents to speak of.
    return tuple(out)


def _set_entries(array, x, pred, *index, read_once: bool = False):
    """`array.at[index].set(x)` where `pred`; the old entry where not."""
    del read_once
    return array.at[index].set(jnp.where(pred, x, array[index]))


@jax.custom_jvp
def _write_entries(array, x, pred, *index):
    """`_set_entries` (integer scalar indices, `x` of the entry's shape) whose
    tangent is `write_entries_p`."""
    return _set_entries(array, x, pred, *index)


@_write_entries.defjvp
def _write_entries_jvp(primals, tangents):
    array, x, pred, *index = primals
    t_array, t_x = tangents[:2]
    out = _write_entries(array, x, pred, *index)
    return out, write_entries_p.bind(t_array, t_x, pred, *index, read_once=False)


def _write_entries_transpose(ct, t_array, t_x, pred, *index, read_once):
    index = tuple(index)
    no_grad = [None] * (1 + len(index))  # `pred` and the indices.
    if is_zero(ct):
        return [None, None, *no_grad]
    entry = ct.at[index].get(mode="fill", fill_value=0)
    ct_x = None
    if is_undefined_primal(t_x):
        ct_x = jnp.where(pred, entry, jnp.zeros_like(entry))
    ct_array = None
    if is_undefined_primal(t_array):
        if read_once:
            ct_array = ct
        else:  # Where written, the old entry does not reach the output.
            ct_array = ct.at[index].set(jnp.where(pred, jnp.zeros_like(entry), entry))
    return [ct_array, ct_x, *no_grad]


def _write_entries_batch(args, dims, *, read_once):
    # Batched writes take the plain path (the exact transpose).
    del read_once
    return jax.vmap(_set_entries, in_axes=tuple(dims))(*args), 0


def _write_entries_jvp_rule(primals, tangents, *, read_once):
    t_array, t_x = (instantiate_zeros(t) for t in tangents[:2])
    out = write_entries_p.bind(*primals, read_once=read_once)
    return out, write_entries_p.bind(t_array, t_x, *primals[2:], read_once=read_once)


# The tangent of a buffer write: linear in the buffer and the value written.
write_entries_p = define_primitive(
    "loopax_buffer_write",
    impl=_set_entries,
    abstract_eval=lambda t_array, *_, read_once: t_array,
    jvp=_write_entries_jvp_rule,
    transpose=_write_entries_transpose,
    batch=_write_entries_batch,
)


def mark_read_once(jaxpr: ClosedJaxpr, carried: Sequence[bool]) -> ClosedJaxpr:
    """`jaxpr` with `read_once=True` on the buffer writes (`write_entries_p`, at its
    top level) whose target is one of the inputs marked `carried`, directly or
    through earlier such writes. Writes into anything else (arrays made in the
    body, nested loops) keep the exact transpose."""

    def rewrite(eqn, targets):
        if eqn.primitive is write_entries_p and eqn.invars[0] in targets:
            return eqn_with_params(eqn, read_once=True), True
        return eqn, False

    return map_eqns(jaxpr, rewrite, inputs=carried)
