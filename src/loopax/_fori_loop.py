"""`loopax.fori_loop`: `jax.lax.fori_loop` that stays reverse-mode differentiable.

Static bounds give a loop of known length: it runs as `loopax.scan` (optimal revolve
checkpointing). Traced bounds give a loop of unknown length: it runs as
`loopax.while_loop`, which, unlike `lax.fori_loop` with traced bounds, still supports
reverse mode with `kind="checkpointed"` or `kind="bounded"`.
"""

import functools as ft
import operator
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax.numpy as jnp
import jax.tree_util as jtu

from ._custom_types import KINDS, Kind
from ._scan import scan
from ._while_loop import BUFFER_NAMES_ATTR, check_loop_options, while_loop


_Carry = TypeVar("_Carry")


def _static_int(x: Any) -> int | None:
    """`x` as a Python int if it is a concrete integer, else `None` (traced)."""
    if isinstance(x, bool):
        raise TypeError(f"`lower` and `upper` must be integers, got {x!r}.")
    try:
        return operator.index(x)
    except Exception:  # A tracer, or not an integer at all (checked below).
        return None


def _fori_buffer_name(position: int, path: Any) -> str | None:
    """`check_buffers=True`: a buffer's name from its key path in the carry that wraps
    `init_val` at `position`."""
    if path and path[0] == jtu.SequenceKey(position):
        return "init_val" + jtu.keystr(path[1:])
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

    Returns what `lax.fori_loop(lower, upper, body_fun, init_val)` returns.

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
    - `kind`: `"checkpointed"` (default), `"lax"` (forward mode only) or `"bounded"`.
    - `checkpoints`: for `kind="checkpointed"`, how many states the backward pass may
        store besides `init_val` (`"all"` with static bounds: every step; `"auto"`
        with `memory_budget`: as many as fit).
    - `memory_budget`: with `checkpoints="auto"` only: the bytes the checkpoints may
        take, an int or a string such as `"2GiB"`; see [`loopax.while_loop`][].
    - `max_steps`: a bound on the number of steps; required by `kind="bounded"` with
        traced bounds. With static bounds it is ignored by the scan path.
    - `buffers`: as for [`loopax.while_loop`][], a function from `val` to its
        write-once arrays.
    - `base`: for `kind="bounded"`, about the length of each nested scan.
    - `check_buffers`: if `True`, check the buffer contract at run time (a debugging
        aid; default `False`, at no cost), as for [`loopax.while_loop`][]. Buffers are
        named by their path in `init_val`, e.g. `init_val['out']`.

    **Returns:**

    The final value.
    """
    if not callable(body_fun):
        raise TypeError(
            f"`body_fun` must be callable, `(i, val) -> val`, got {body_fun!r}."
        )
    if not isinstance(kind, str) or kind not in KINDS:
        # The shared check below gives the full message.
        check_loop_options(
            kind=kind, max_steps=None, checkpoints=None, base=base, buffers=None
        )
    static_lower, static_upper = _static_int(lower), _static_int(upper)
    if static_lower is not None and static_upper is not None and kind != "bounded":
        length = max(static_upper - static_lower, 0)
        check_loop_options(
            kind=kind,
            max_steps=max_steps,
            checkpoints=checkpoints,
            base=base,
            buffers=buffers,
            memory_budget=memory_budget,
            allow_all=True,
            check_buffers=check_buffers,
        )

        def step(carry, _):
            i, val = carry
            return (i + 1, body_fun(i, val)), None

        # Name checked buffers after `init_val`, not the scan's `(i, init_val)`.
        setattr(step, BUFFER_NAMES_ATTR, ft.partial(_fori_buffer_name, 1))

        i0 = jnp.array(static_lower, jnp.int32)
        scan_buffers = None if buffers is None else lambda c: buffers(c[1])
        (_, val), _ = scan(
            step,
            (i0, init_val),
            None,
            length,
            kind=kind,  # pyright: ignore[reportArgumentType]
            checkpoints=checkpoints,
            memory_budget=memory_budget,
            buffers=scan_buffers,
            check_buffers=check_buffers,
        )
        return val
    if static_lower is not None and static_upper is not None and max_steps is None:
        max_steps = max(static_upper - static_lower, 0)
    for name, bound in (("lower", lower), ("upper", upper)):
        if not jnp.issubdtype(jnp.result_type(bound), jnp.integer):
            raise TypeError(
                f"`{name}` must be an integer (a Python int or an integer array), "
                f"got {bound!r}."
            )
    if kind == "bounded" and max_steps is None:
        raise ValueError(
            "kind='bounded' with traced `lower`/`upper` needs `max_steps`: pass an "
            "int bound on `upper - lower`, or use kind='checkpointed'."
        )
    dtype = jnp.result_type(lower, upper)
    lower = jnp.asarray(lower, dtype)
    upper = jnp.asarray(upper, dtype)
    while_buffers = None if buffers is None else lambda c: buffers(c[2])

    def while_body(c):
        return c[0] + 1, c[1], body_fun(c[0], c[2])

    # Name checked buffers after `init_val`, not the loop's `(i, upper, init_val)`.
    setattr(while_body, BUFFER_NAMES_ATTR, ft.partial(_fori_buffer_name, 2))
    _, _, val = while_loop(
        lambda c: c[0] < c[1],
        while_body,
        (lower, upper, init_val),
        kind=kind,
        checkpoints=checkpoints,  # pyright: ignore[reportArgumentType]
        memory_budget=memory_budget,
        max_steps=max_steps,
        buffers=while_buffers,
        base=base,
        check_buffers=check_buffers,
    )
    return val
