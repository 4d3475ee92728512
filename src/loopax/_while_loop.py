"""`loopax.while_loop`: validate, normalise, dispatch on `kind`."""

import operator
from collections.abc import Callable
from typing import Any, Literal, SupportsIndex, TypeVar

import jax.numpy as jnp
import jax.tree_util as jtu

from ._backends.bounded import bounded_while_loop
from ._backends.checkpointed import checkpointed_while_loop
from ._backends.lax import lax_while_loop
from ._custom_types import KINDS, Kind
from ._planning import checkpoints_for_budget
from ._schedule import parse_memory_budget
from ._state import Loop


_Carry = TypeVar("_Carry")


_MAX_STEPS_LIMIT = 2**31 - 1


def _check_int(
    name: str, value: Any, *, minimum: int, optional: bool, hint: str
) -> int | None:
    """Return `value` as an `int` if it is an integer >= `minimum` (or `None` if
    `optional`); otherwise raise: `TypeError` for a non-integer (bools included),
    `ValueError` for an integer below `minimum`."""
    if value is None and optional:
        return None
    if minimum == 0:
        wanted = "a non-negative integer"
    elif minimum == 1:
        wanted = "a positive integer"
    else:
        wanted = f"an integer >= {minimum}"
    if optional:
        wanted += " or None"
    message = f"`{name}` must be {wanted}, got {value!r}. {hint}"
    if isinstance(value, bool) or not isinstance(value, SupportsIndex):
        raise TypeError(message)
    try:
        index = operator.index(value)
    except TypeError as e:  # e.g. a traced integer: must be static.
        raise TypeError(message + " It must be a static Python int.") from e
    if index < minimum:
        raise ValueError(message)
    return index


def check_loop_options(
    *,
    kind: Any,
    max_steps: Any,
    checkpoints: Any,
    base: Any,
    buffers: Any,
    memory_budget: Any = None,
    allow_all: bool = False,
    check_buffers: Any = False,
) -> int | None:
    """Validate the options shared by every loopax front end; return `max_steps`.

    `checkpoints` may be the string `"auto"`, which needs `memory_budget` (and
    `memory_budget` needs `checkpoints="auto"`). With `allow_all` (front ends whose
    trip count is known), `checkpoints` may also be the string `"all"`: store every
    step.
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}. "
            "Use kind='lax' for forward mode only, kind='checkpointed' for reverse "
            "mode with a fixed memory budget, kind='bounded' for reverse mode up to "
            "`max_steps`."
        )
    max_steps = _check_int(
        "max_steps",
        max_steps,
        minimum=0,
        optional=True,
        hint="Pass an int bound on the number of body calls, or None for no bound.",
    )
    if max_steps is not None and max_steps > _MAX_STEPS_LIMIT:
        # The step counter is an int32: a larger bound would overflow it silently.
        raise ValueError(
            f"`max_steps` must be at most 2**31 - 1 = {_MAX_STEPS_LIMIT} (loops count "
            f"their steps in int32), got {max_steps}. Pass a smaller bound, or "
            "`max_steps=None` for no bound."
        )
    named = ("all", "auto") if allow_all else ("auto",)
    auto = isinstance(checkpoints, str) and checkpoints == "auto"
    if not (isinstance(checkpoints, str) and checkpoints in named):
        _check_int(
            "checkpoints",
            checkpoints,
            minimum=1,
            optional=True,
            hint="Pass how many loop states the backward pass may store (e.g. 16), "
            + ("'all' to store every step, " if allow_all else "")
            + "'auto' with `memory_budget=` to fit a memory budget, "
            + "or None for the default.",
        )
    if auto and memory_budget is None:
        raise ValueError(
            "checkpoints='auto' needs `memory_budget`: pass the bytes the checkpoints "
            'may take, e.g. `memory_budget="2GiB"`, or an int `checkpoints=`.'
        )
    if memory_budget is not None:
        if not auto:
            raise ValueError(
                f"`memory_budget` is used only with checkpoints='auto', got "
                f"checkpoints={checkpoints!r}. Pass checkpoints='auto' to choose the "
                "number of checkpoints from the budget, or drop `memory_budget`."
            )
        parse_memory_budget(memory_budget)
    _check_int(
        "base",
        base,
        minimum=2,
        optional=False,
        hint="Pass the length of the innermost scan of kind='bounded', e.g. 16.",
    )
    if buffers is not None and not callable(buffers):
        raise TypeError(
            "`buffers` must be None or a function from the carry to some of its "
            f"arrays, got {buffers!r}. Pass e.g. `buffers=lambda carry: carry[1]`."
        )
    if kind == "bounded" and max_steps is None:
        raise ValueError(
            "kind='bounded' needs `max_steps`: pass an int bound, or use "
            "kind='checkpointed'."
        )
    _check_check_buffers(check_buffers)
    return max_steps


def _check_check_buffers(check_buffers: Any) -> None:
    if not isinstance(check_buffers, bool):
        raise TypeError(
            f"`check_buffers` must be a bool, got {check_buffers!r}. Pass "
            "check_buffers=True to check the buffer contract at run time (a debugging "
            "aid), or leave it False (the default, no cost)."
        )


# With `check_buffers=True`, a buffer is named in errors by its key path in the
# carry argument (`init_val['out']`). A front end that wraps the user's carry in a
# bigger one (`loopax.fori_loop`) sets this attribute on the body it passes on: a
# function from a leaf's key path in the carry it passes to the name to report.
BUFFER_NAMES_ATTR = "_loopax_buffer_names"


def buffer_names(body: Any, argument: str) -> Callable[[Any], str | None]:
    """`check_names` for `Loop`: as `body` says, else the path in `argument`."""
    names = getattr(body, BUFFER_NAMES_ATTR, None)
    if names is not None:
        return names
    return lambda path: argument + jtu.keystr(path)


def _check_callable(name: str, fn: Any) -> None:
    if not callable(fn):
        raise TypeError(
            f"`{name}` must be callable (a function of the carry), got {fn!r}."
        )


def while_loop(
    cond_fun: Callable[[_Carry], Any],
    body_fun: Callable[[_Carry], _Carry],
    init_val: _Carry,
    *,
    max_steps: int | None = None,
    kind: Kind = "checkpointed",
    checkpoints: int | Literal["auto"] | None = None,
    memory_budget: int | str | None = None,
    buffers: Callable[[_Carry], Any] | None = None,
    base: int = 16,
    check_buffers: bool = False,
) -> _Carry:
    """A `jax.lax.while_loop` that you can choose to differentiate in reverse mode.

    Returns exactly what `lax.while_loop(cond_fun, body_fun, init_val)` returns (same
    structure, shapes, dtypes) for every `kind`; the kinds differ in which
    transformations they support and what reverse mode costs: `"lax"` is forward
    mode only; `"checkpointed"` (the default) supports every transformation, its
    `jvp` one loop like `"lax"`'s, its reverse mode storing `checkpoints` states and
    recomputing the rest; `"bounded"` unrolls into nested `lax.scan`s up to
    `max_steps`. The full table is [What each kind supports](../index.md#what-each-kind-supports);
    [Choosing a kind](../choosing-a-kind.md) says which to use.

    Under `vmap` with a batched predicate the batch runs in lock-step until every
    element is done; finished elements are frozen.

    **Arguments:**

    - `cond_fun`: carry -> boolean scalar; the loop continues while it is True.
    - `body_fun`: carry -> carry of the same structure, shapes and dtypes.
    - `init_val`: the initial carry, any pytree of arrays (or array-likes).
    - `max_steps`: stop after at most this many calls of `body_fun` (silently, as a
      bound, not an error). Required for `kind="bounded"`.
    - `kind`: `"lax"`, `"checkpointed"` (default) or `"bounded"`; see above.
    - `checkpoints`: for `kind="checkpointed"`, how many loop states the backward pass
      may store, besides the initial value: a positive int; `"auto"` with
      `memory_budget` for as many as fit the budget
      ([`loopax.checkpoints_for_budget`][]); or `None` (default):
      `max(1, ceil(log2(max_steps + 1)))` when `max_steps` is
      given, else reverse mode raises an error asking for one. Ignored by the other
      kinds. [`loopax.schedule`][] shows what a choice costs, and
      [`loopax.suggest_checkpoints`][] picks one from a recompute target.
    - `memory_budget`: with `checkpoints="auto"` only: the bytes the checkpoints may
      take, an int or a string such as `"2GiB"`, `"512MB"`, `"1.5 GB"`. The number of
      checkpoints is the largest whose copies of the carry (buffers excluded, sizes
      read at trace time) fit, at most `max_steps` (then every step is stored). A
      `ValueError` says so if not even one fits.
    - `buffers`: a function from the carry to the arrays in it (a node, a sequence of
      nodes, possibly containing `None`) that the body writes at most once per index.
      Inside `cond_fun`/`body_fun` they appear as [`loopax.Buffer`][]s.
    - `base`: for `kind="bounded"`, about the length of each nested scan: it sets the
      nesting depth (the fewest levels `d` with `max_steps < 2 * base**d`). Ignored
      otherwise.
    - `check_buffers`: a debugging aid (default `False`). If `True`, every access to a
      buffer is checked at run time against the buffer contract, and a second write
      to an index, a read of an index not yet written, or an out-of-bounds index
      raises an error naming the buffer (e.g. `init_val['out']`) and the index. Each
      checked buffer carries a boolean mask of its shape (stored in checkpoints like
      the rest of the carry) and each access a check: use it while debugging. Off,
      it costs nothing. See [Buffers](../buffers.md#checking-the-contract).

    **Returns:**

    The final carry.

    !!! danger

        Buffers must follow the contract in [`loopax.Buffer`][]: each index written
        at most once, read only after it was written. It is checked only with
        `check_buffers=True`.
    """
    _check_callable("cond_fun", cond_fun)
    _check_callable("body_fun", body_fun)
    max_steps = check_loop_options(
        kind=kind,
        max_steps=max_steps,
        checkpoints=checkpoints,
        base=base,
        buffers=buffers,
        memory_budget=memory_budget,
        check_buffers=check_buffers,
    )
    init_val = jtu.tree_map(jnp.asarray, init_val)
    if isinstance(checkpoints, str):  # "auto"; validated: `memory_budget` is given.
        assert memory_budget is not None
        checkpoints = None
        if kind == "checkpointed":
            checkpoints = checkpoints_for_budget(
                init_val, memory_budget, buffers=buffers, max_steps=max_steps
            )
    del memory_budget
    loop = Loop(
        cond_fun,
        body_fun,
        init_val,
        max_steps,
        buffers,
        check_names=buffer_names(body_fun, "init_val") if check_buffers else None,
        names=buffer_names(body_fun, "init_val"),
    )
    del cond_fun, body_fun, init_val, buffers
    if kind == "lax":
        final = lax_while_loop(loop)
    elif kind == "checkpointed":
        final = checkpointed_while_loop(loop, checkpoints=checkpoints)
    elif kind == "bounded":
        final = bounded_while_loop(loop, base=base)
    else:
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}."
        )
    return loop.final_value(final.value)
