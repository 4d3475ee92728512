"""`loopax.fori_loop`: `jax.lax.fori_loop` that stays reverse-mode differentiable.

Static bounds give a loop of known length: it runs as `loopax.scan` (optimal revolve
checkpointing). Traced bounds give a loop of unknown length: it runs as
`loopax.while_loop`, which, unlike `lax.fori_loop` with traced bounds, still supports
reverse mode with `kind="checkpointed"` or `kind="bounded"`.
"""

import operator
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp

from ._custom_types import Kind
from ._jax_internals import is_weakly_typed
from ._scan import run_scan
from ._validate import Names, check_callable, check_kind, check_loop_options
from ._while_loop import checkpoints_from_budget, run_while_loop


_Carry = TypeVar("_Carry")


def _check_bound(name: str, bound: Any) -> Any:
    """`bound` as an integer scalar (a Python int stays one), or raise naming it."""
    if jax.export.is_symbolic_dim(bound):  # A shape under `jax.export`: traced.
        return jnp.asarray(bound)
    if isinstance(bound, bool) or not (
        isinstance(bound, int)
        or (hasattr(bound, "dtype") and jnp.issubdtype(bound.dtype, jnp.integer))
    ):
        raise TypeError(
            f"`{name}` must be an integer (a Python int or an integer array), "
            f"got {bound!r}."
        )
    if jnp.shape(bound) != ():
        raise TypeError(f"`{name}` must be a scalar, got shape {jnp.shape(bound)}.")
    return bound


def _index_dtype(lower: Any, upper: Any) -> Any:
    """The dtype of the loop index, by `lax.fori_loop`'s rule: the bounds' common
    dtype, or the dtype of the strongly typed one when the other is weakly typed."""
    lower_dtype, upper_dtype = jnp.result_type(lower), jnp.result_type(upper)
    if lower_dtype == upper_dtype:
        return lower_dtype
    lower_weak, upper_weak = is_weakly_typed(lower), is_weakly_typed(upper)
    if lower_weak and not upper_weak:
        return upper_dtype
    if upper_weak and not lower_weak:
        return lower_dtype
    raise TypeError(
        f"`lower` and `upper` must have the same integer dtype (or one of them be a "
        f"Python int), got {lower_dtype} and {upper_dtype}. Cast one of them, e.g. "
        "`upper.astype(lower.dtype)`, as for `jax.lax.fori_loop`."
    )


def _static_int(x: Any) -> int | None:
    """`x` as a Python int if it is concrete, else `None` (traced)."""
    try:
        return operator.index(x)
    except TypeError:  # A tracer.
        return None


def fori_loop(
    lower: Any,
    upper: Any,
    body_fun: Callable[[Any, _Carry], _Carry],
    init_val: _Carry,
    *,
    kind: Kind = "checkpointed",
    checkpoints: int | Literal["all", "auto"] | None = None,
    memory_budget: int | str | None = None,
    max_steps: int | None = None,
    buffers: Callable[[_Carry], Any] | None = None,
    base: int = 16,
    check_buffers: bool = False,
) -> _Carry:
    """A `jax.lax.fori_loop` that you can differentiate in reverse mode.

    Returns what `lax.fori_loop(lower, upper, body_fun, init_val)` returns, with the
    same types, and gives `body_fun` the index `lax.fori_loop` gives it: with static
    bounds a weakly typed integer of JAX's default integer dtype (`int64` with
    `jax_enable_x64`), with traced bounds the bounds' common dtype.

    - **Static bounds** (Python ints, or concrete integer arrays): the loop has
        `max(upper - lower, 0)` steps, known up front, and runs as [`loopax.scan`][]
        (`kind="lax"` or `"checkpointed"`; the checkpointed gradient recomputes the
        offline optimum). `kind="bounded"` runs [`loopax.while_loop`][] with
        `max_steps` defaulting to the number of steps.
    - **Traced bounds**: the trip count is unknown when tracing, so the loop runs as
        [`loopax.while_loop`][] over `(i, upper, val)`. Where `lax.fori_loop` would
        refuse reverse mode, `kind="checkpointed"` (with `checkpoints=` or
        `max_steps=`) and `kind="bounded"` (with `max_steps=`) differentiate it.

    **Arguments:**

    - `lower`, `upper`: the loop runs `body_fun(i, val)` for `i` in `[lower, upper)`.
    - `body_fun`: `(i, val) -> val` of the same structure, shapes and dtypes.
    - `init_val`: the initial value, any pytree of arrays (or array-likes).
    - `kind`: `"checkpointed"` (default), `"lax"` or `"bounded"`. With static bounds
        `"lax"` is a plain `lax.scan` (reverse mode stores every step); with traced
        bounds a plain `lax.while_loop` (forward mode only).
    - `checkpoints`: for `kind="checkpointed"`, how many states the backward pass may
        store besides `init_val` (`"all"` with static bounds: every step; `"auto"`
        with `memory_budget`: as many as fit).
    - `memory_budget`: with `checkpoints="auto"` only: the bytes the checkpoints may
        take, an int or a string such as `"2GiB"`; see [`loopax.while_loop`][].
    - `max_steps`: at most this many calls of `body_fun`, then the loop stops
        silently (as for [`loopax.while_loop`][]): the loop runs `body_fun(i, val)`
        for `i` in `[lower, min(upper, lower + max_steps))`, for every `kind` and both
        static and traced bounds. Required by `kind="bounded"` with traced bounds.
    - `buffers`: as for [`loopax.while_loop`][], a function from `val` to its
        write-once arrays.
    - `base`: for `kind="bounded"`, about the length of each nested scan.
    - `check_buffers`: if `True`, check the buffer contract at run time (a debugging
        aid; default `False`, at no cost), as for [`loopax.while_loop`][]. Buffers are
        named by their path in `init_val`, e.g. `init_val['out']`.

    **Returns:**

    The final value.
    """
    check_callable("body_fun", body_fun, "`(i, val) -> val`")
    check_kind(kind)
    lower, upper = _check_bound("lower", lower), _check_bound("upper", upper)
    if (
        kind == "bounded"
        and max_steps is None
        and not (_static_int(lower) is not None and _static_int(upper) is not None)
    ):
        raise ValueError(
            "kind='bounded' with traced `lower`/`upper` needs `max_steps`: pass "
            "an int bound on `upper - lower`, or use kind='checkpointed'."
        )
    dtype = _index_dtype(lower, upper)
    static_lower, static_upper = _static_int(lower), _static_int(upper)
    static = static_lower is not None and static_upper is not None
    if static and max_steps is None:  # The number of steps is the bound.
        assert static_lower is not None and static_upper is not None
        max_steps = max(static_upper - static_lower, 0)
    max_steps = check_loop_options(
        kind=kind,
        max_steps=max_steps,
        checkpoints=checkpoints,
        base=base,
        buffers=buffers,
        memory_budget=memory_budget,
        allow_all=static,
        check_buffers=check_buffers,
    )
    if static:
        # As `lax.fori_loop`: the index starts as a Python int (weakly typed).
        assert static_lower is not None and static_upper is not None
        assert max_steps is not None
        max_steps = min(max(static_upper - static_lower, 0), max_steps)
        lower, upper = jnp.asarray(static_lower), jnp.asarray(static_upper)
    else:
        lower, upper = jnp.asarray(lower), jnp.asarray(upper)
        if lower.dtype != dtype:
            lower = lower.astype(dtype)
        if upper.dtype != dtype:
            upper = upper.astype(dtype)
    init_val = jax.tree_util.tree_map(jnp.asarray, init_val)
    checkpoints = checkpoints_from_budget(
        checkpoints, memory_budget, kind, init_val, buffers, max_steps
    )
    del memory_budget
    names = Names(body="body_fun", carry="init_val")
    if static and kind != "bounded":

        def step(carry, _):
            i, val = carry
            return (i + 1, body_fun(i, val)), None

        (_, val), _ = run_scan(
            step,
            (lower, init_val),
            None,
            max_steps,  # pyright: ignore[reportArgumentType]
            reverse=False,
            kind=kind,
            checkpoints=checkpoints,
            buffers=None if buffers is None else lambda c: buffers(c[1]),
            check_buffers=check_buffers,
            names=names.inside(1),
        )
        return val
    if checkpoints == "all":
        checkpoints = max(max_steps or 0, 1)

    def while_body(c):
        i, upper, val = c
        return i + 1, upper, body_fun(i, val)

    _, _, val = run_while_loop(
        lambda c: c[0] < c[1],
        while_body,
        (lower, upper, init_val),
        kind=kind,
        max_steps=max_steps,
        checkpoints=checkpoints,  # pyright: ignore[reportArgumentType]
        buffers=None if buffers is None else lambda c: buffers(c[2]),
        base=base,
        check_buffers=check_buffers,
        names=names.inside(2),
    )
    return val
