"""`check_buffers=True`: run-time checks of the buffer contract.

The contract of a buffer (each entry written at most once per loop, read only after it
was written) is what lets the checkpointed kind replay steps against the *final*
buffer. A violation does not fail: it gives wrong gradients. In this debugging mode
every checked buffer also carries a boolean `written` mask of its own shape (an ordinary
carry leaf, so the checkpointed kind stores and restores it like any other state and
recomputed steps see exactly the mask their first run saw), and every access checks
it:

- a write to an entry already written: "second write";
- a read of an entry not yet written: "read ... before it was written";
- an index outside the buffer (unless the access passes `mode=` explicitly).

The error names the buffer by its path in the carry the user passed (e.g.
`init_val['out']`) and the offending index. A failed check raises
`BufferContractError` from a `jax.debug.callback` that runs only when some check failed
(a `lax.cond` on the unbatched "any failed" flag). The loop always runs compiled, and
JAX reports an exception raised in a callback as a `JaxRuntimeError` whose text is a
Python stack followed by our message. So that the user reads loopax's message first:
a loop called eagerly (no tracer among its inputs) catches that error and raises
`BufferContractError` with the message alone (`reporting_contract_errors`); inside a
trace (under the user's `jax.jit`), where no loopax code runs after the program, the
callback writes the message to stderr before it raises, ahead of JAX's report. Under
`vmap` the callback runs per batch element, and the first offending element's index is
reported.

Nothing here runs unless `check_buffers=True`: with the default `False` no mask exists
and `Buffer` takes its unchecked path, so the traced program is unchanged.
"""

import functools as ft
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from ._jax_internals import is_tracer
from ._unvmap import unvmap_any


# The code for "no index to report" (not an offending element, or not a scalar index).
_NO_INDEX = int(np.iinfo(np.int32).min)

_PREFIX = "loopax check_buffers=True: "

SECOND_WRITE = (
    _PREFIX + "second write to index {index} of buffer `{name}`. Each entry of a "
    "buffer may be written at most once per loop: write each index once (skip a write "
    "with `pred=`), or do not declare this array in `buffers=`."
)
UNWRITTEN_READ = (
    _PREFIX + "read of index {index} of buffer `{name}` before it was written in "
    "this loop. A buffer may be read only where this loop has already written it: "
    "write the entry first, or do not declare this array in `buffers=`."
)
OUT_OF_BOUNDS = (
    _PREFIX + "out-of-bounds {access} at index {index} of buffer `{name}` of shape "
    "{shape}. Keep indices in range, or pass `mode=` (e.g. `mode='drop'`) to choose "
    "what out-of-bounds indices do."
)


class BufferContractError(RuntimeError):
    """A buffer access broke the buffer contract: raised while the loop runs, with
    `check_buffers=True`.

    A loop called outside any transformation raises it as it is. Inside `jax.jit`
    (or another trace) JAX reports it as a `jax.errors.JaxRuntimeError` whose text
    ends with this error's; loopax also writes the message to stderr first.
    [The error catalogue](../errors.md#run-time-buffer-checks) lists the messages.
    """


BufferContractError.__module__ = "loopax"


class _IndexMessages(Sequence[str]):
    """The messages of one check, indexed by the offending index (formatted lazily).

    `item` is the static description of the index expression; the scalar component at
    position `slot` is the run-time value reported by the check."""

    def __init__(self, template: str, name: str, item: tuple, slot: int | None, **kw):
        self._key = (template, name, item, slot, tuple(sorted(kw.items())))

    def __getitem__(self, code: Any) -> str:  # pyright: ignore[reportIncompatibleMethodOverride]
        template, name, item, slot, kw = self._key
        parts = list(item)
        if slot is not None:
            parts[slot] = "?" if code == _NO_INDEX else str(code)
        index = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
        return template.format(name=name, index=index, **dict(kw))

    def __len__(self) -> int:
        return 2**32

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _IndexMessages) and self._key == other._key


class _SkipOwnErrors(logging.Filter):
    """Drop the log record JAX writes for an exception raised in a callback when it
    is ours: the same message reaches the user once, in the exception itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, BufferContractError)


_SKIP_OWN_ERRORS = _SkipOwnErrors()


def _quiet_callback_log() -> None:
    # The logger of the module that defines `jax.debug.callback` (where JAX logs a
    # failed callback). If JAX logs elsewhere, the message is merely shown twice.
    logger = logging.getLogger(jax.debug.callback.__module__)
    if _SKIP_OWN_ERRORS not in logger.filters:
        logger.addFilter(_SKIP_OWN_ERRORS)


class _EagerRun:
    """The failure message of the loop now running eagerly inside
    `reporting_contract_errors` (which re-raises it cleanly), or `None`."""

    active: int = 0
    message: str | None = None


def _raise_if(bad: Any, code: Any, *, messages: _IndexMessages) -> None:
    """Host side of a failed check: raise loopax's message for this element."""
    if bool(np.any(bad)):
        message = messages[int(np.max(code))]
        if _EagerRun.active:
            _EagerRun.message = message
        else:  # JAX's report puts a stack before the message: show it first.
            print(f"loopax.BufferContractError: {message}", file=sys.stderr)
            sys.stderr.flush()
        raise BufferContractError(message)


def reporting_contract_errors(
    check_buffers: bool, init_val: Any, run: Callable[[], Any]
) -> Any:
    """`run()`, a loop's run. If it runs eagerly (no tracer in `init_val`), a failed
    check surfaces as `BufferContractError` with loopax's message alone instead of
    JAX's `JaxRuntimeError` (a Python stack, then the message); the outputs are waited
    for here, so that the failure of an asynchronous run is seen here too."""
    if not check_buffers or any(map(is_tracer, jax.tree_util.tree_leaves(init_val))):
        return run()
    _EagerRun.active += 1
    _EagerRun.message = None
    try:
        out = run()
        # (Still a trace if the loop's functions close over tracers.)
        if not any(map(is_tracer, jax.tree_util.tree_leaves(out))):
            jax.block_until_ready(out)
        return out
    except jax.errors.JaxRuntimeError:
        message = _EagerRun.message
        if message is None:
            raise
        raise BufferContractError(message) from None
    finally:
        _EagerRun.active -= 1


def _error_if(x: Any, bad: Any, code: Any, messages: _IndexMessages) -> Any:
    """`x`, raising `BufferContractError` at run time where `bad` holds.

    The callback runs only if some (batch element's) check failed, so a correct
    program pays one unbatched flag per access, not a host call."""
    _quiet_callback_log()
    bad = jnp.asarray(bad, dtype=bool)
    code = jnp.asarray(code, dtype=jnp.int32)

    def fail():
        jax.debug.callback(ft.partial(_raise_if, messages=messages), bad, code)

    lax.cond(unvmap_any(jnp.any(bad)), fail, lambda: None)
    return x


def _describe_component(c: Any) -> str:
    if c is Ellipsis:
        return "..."
    if c is None:
        return "None"
    if isinstance(c, slice):
        text = ":".join("" if v is None else str(v) for v in (c.start, c.stop))
        return text if c.step is None else f"{text}:{c.step}"
    if isinstance(c, int | np.integer):
        return str(int(c))
    return "?"


def _is_integer_index(c: Any) -> bool:
    if c is None or c is Ellipsis or isinstance(c, slice | bool):
        return False
    try:
        return bool(jnp.issubdtype(jnp.result_type(c), jnp.integer))
    except TypeError:
        return False


def _components(shape: tuple[int, ...], item: Any) -> list[tuple[Any, int | None]]:
    """Each component of `item` with the size of the axis it indexes (None if it
    indexes no axis of the buffer, or we cannot tell)."""
    items = item if isinstance(item, tuple) else (item,)

    def consumes(c: Any) -> int:
        if c is None or c is Ellipsis:
            return 0
        if isinstance(c, bool):
            return 0
        try:
            dtype = jnp.result_type(c)
        except TypeError:
            return 1
        return jnp.ndim(c) if dtype == jnp.bool_ else 1

    out = []
    axis = 0
    for position, c in enumerate(items):
        if c is Ellipsis:
            rest = sum(consumes(d) for d in items[position + 1 :])
            axis = len(shape) - rest
            out.append((c, None))
            continue
        n = consumes(c)
        size = shape[axis] if n == 1 and axis < len(shape) else None
        out.append((c, size))
        axis += n
    return out


def _index_code(
    components: list[tuple[Any, int | None]], bad: Any
) -> tuple[Any, int | None]:
    """The run-time integer to report (the first scalar integer component that is not
    static), masked by `bad`, and its position."""
    for position, (c, _) in enumerate(components):
        if _is_integer_index(c) and jnp.ndim(c) == 0 and not isinstance(c, int):
            value = jnp.asarray(c)
            info = jnp.iinfo(value.dtype)
            value = jnp.clip(
                value, max(info.min, _NO_INDEX + 1), min(info.max, 2**31 - 1)
            )
            code = jnp.where(bad, value.astype(jnp.int32), jnp.int32(_NO_INDEX))
            return code, position
    return 0, None


def _out_of_bounds(components: list[tuple[Any, int | None]]) -> Bool[Array, ""] | bool:
    oob: Any = False
    for c, size in components:
        if size is None or not _is_integer_index(c):
            continue
        c = jnp.asarray(c)
        outside = c >= size
        if not jnp.issubdtype(c.dtype, jnp.unsignedinteger):
            outside = outside | (c < -size)
        oob = oob | jnp.any(outside)
    return oob


def _and(a: Any, b: Any) -> Any:
    """`a & b` for Python and array booleans, where `True` folds away."""
    if a is True:
        return b
    if b is True:
        return a
    return jnp.logical_and(a, b)


def _mask_get(written: Array, item: Any, kwargs: dict, fill: bool) -> Array:
    """The entries of the mask that an access with `item` and `kwargs` touches; where
    an explicit `mode='fill'`/`'drop'` makes an out-of-bounds access a no-op, `fill`."""
    get_kwargs = {
        k: v
        for k, v in kwargs.items()
        if k in ("mode", "indices_are_sorted", "unique_indices")
    }
    if str(get_kwargs.get("mode", "")).lower() in ("fill", "drop", "fill_or_drop"):
        get_kwargs["fill_value"] = fill
    return written.at[item].get(**get_kwargs)


def _check(
    x: Any,
    bad: Any,
    template: str,
    name: str,
    shape: tuple[int, ...],
    components: list[tuple[Any, int | None]],
    **kw: Any,
) -> Any:
    if bad is False:
        return x
    code, slot = _index_code(components, bad)
    item = tuple(_describe_component(c) for c, _ in components)
    messages = _IndexMessages(template, name, item, slot, shape=shape, **kw)
    return _error_if(x, bad, code, messages)


def _checked_access(
    value: Any,
    shape: tuple[int, ...],
    components: list[tuple[Any, int | None]],
    kwargs: dict,
    name: str,
    active: Any,
    access: str,
    misuse: Any,
    template: str,
) -> Any:
    """`value`, raising at run time if `active` and the access is out of bounds
    (`OUT_OF_BOUNDS`), or else `misuse` holds (`template`)."""
    oob = False if "mode" in kwargs else _out_of_bounds(components)
    value = _check(
        value, _and(active, oob), OUT_OF_BOUNDS, name, shape, components, access=access
    )
    if oob is not False:
        misuse = misuse & ~oob
    return _check(value, _and(active, misuse), template, name, shape, components)


def checked_get(
    array: Array,
    written: Array,
    name: str,
    active: Any,
    item: Any,
    kwargs: dict,
) -> Array:
    """`array.at[item].get(**kwargs)`, raising at run time if `active` and the access
    is out of bounds or reads an entry not yet written."""
    unwritten = ~jnp.all(_mask_get(written, item, kwargs, fill=True))
    return _checked_access(
        array.at[item].get(**kwargs),
        array.shape,
        _components(array.shape, item),
        kwargs,
        name,
        active,
        "read",
        unwritten,
        UNWRITTEN_READ,
    )


def checked_value(
    array: Array,
    written: Array,
    name: str,
    pred: Any,
    item: Any,
    x: Any,
    kwargs: dict,
) -> Array:
    """`x` as the array to write at `item`, raising at run time if `pred` and the
    write is out of bounds or hits an entry already written."""
    again = jnp.any(_mask_get(written, item, kwargs, fill=False))
    return _checked_access(
        jnp.asarray(x, dtype=array.dtype),
        array.shape,
        _components(array.shape, item),
        kwargs,
        name,
        pred,
        "write",
        again,
        SECOND_WRITE,
    )
