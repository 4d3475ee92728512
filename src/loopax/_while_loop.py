"""`loopax.while_loop`: validate, normalise, dispatch on `kind`."""

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._backends.bounded import bounded_while_loop
from ._backends.checkpointed import checkpointed_while_loop
from ._backends.lax import lax_while_loop
from ._buffer import Buffer
from ._check_buffers import reporting_contract_errors
from ._custom_types import KINDS, Kind
from ._planning import carry_bytes, checkpoints_for_budget
from ._state import Loop
from ._validate import (
    Names,
    check_callable,
    check_checkpoint_bytes,
    check_loop_options,
)


def _is_buffer(x: Any) -> bool:
    return isinstance(x, Buffer)


def physical_struct(x: Any) -> Any:
    """The shape and dtype `x` (an array, array-like or `Buffer`) takes in memory, as
    a `jax.ShapeDtypeStruct`: a typed PRNG key (an extended dtype) as its key data."""
    while isinstance(x, Buffer):
        x = x._array
    struct = jax.eval_shape(jnp.asarray, x)
    if jnp.issubdtype(struct.dtype, jax.dtypes.extended):
        struct = jax.eval_shape(jax.random.key_data, struct)
    return struct


_Carry = TypeVar("_Carry")


def checkpoints_from_budget(
    checkpoints: Any,
    memory_budget: Any,
    kind: str,
    init_val: Any,
    buffers: Callable[[Any], Any] | None,
    max_steps: int | None,
) -> Any:
    """`checkpoints` with `"auto"` replaced by the count that fits `memory_budget`
    (`None` for kinds other than `"checkpointed"`)."""
    if not (isinstance(checkpoints, str) and checkpoints == "auto"):
        return checkpoints
    assert memory_budget is not None  # Validated: "auto" needs a budget.
    if kind != "checkpointed":
        return None
    return checkpoints_for_budget(
        jtu.tree_map(physical_struct, init_val, is_leaf=_is_buffer),
        memory_budget,
        buffers=buffers,
        max_steps=max_steps,
    )


def check_checkpoints_fit(
    checkpoints: Any, init_val: Any, buffers: Callable[[Any], Any] | None
) -> None:
    """Refuse an int `checkpoints` whose stack could never be allocated."""
    if isinstance(checkpoints, int) and checkpoints > 1:
        structs = jtu.tree_map(physical_struct, init_val, is_leaf=_is_buffer)
        check_checkpoint_bytes(checkpoints, carry_bytes(structs, buffers))


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
    structure, shapes, dtypes and weak types; a Python scalar in `init_val` is promoted
    to the body's dtype as `lax` promotes it) for every `kind`; the kinds differ in
    which transformations they support and what reverse mode costs: `"lax"` is
    forward mode only (`jvp`, `jacfwd`, `linearize`); `"checkpointed"` (the default)
    supports every transformation, its `jvp` one loop like `"lax"`'s, its reverse
    mode storing `checkpoints` states and recomputing the rest; `"bounded"` unrolls
    into nested `lax.scan`s up to `max_steps`. The full table is
    [What each kind supports](../index.md#what-each-kind-supports);
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
    check_callable("cond_fun", cond_fun, "a function of the carry")
    check_callable("body_fun", body_fun, "a function of the carry")
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
    checkpoints = checkpoints_from_budget(
        checkpoints, memory_budget, kind, init_val, buffers, max_steps
    )
    del memory_budget
    return run_while_loop(
        cond_fun,
        body_fun,
        init_val,
        kind=kind,
        max_steps=max_steps,
        checkpoints=checkpoints,
        buffers=buffers,
        base=base,
        check_buffers=check_buffers,
        names=Names(),
    )


def run_while_loop(
    cond_fun: Callable,
    body_fun: Callable,
    init_val: Any,
    *,
    kind: str,
    max_steps: int | None,
    checkpoints: Any,
    buffers: Callable[[Any], Any] | None,
    base: int,
    check_buffers: bool,
    names: Names,
) -> Any:
    """`loopax.while_loop` after validation, with `names` for the errors (front ends
    that wrap the user's carry pass theirs)."""
    if kind == "checkpointed" and isinstance(checkpoints, int):
        stored = checkpoints if max_steps is None else min(checkpoints, max_steps)
        check_checkpoints_fit(stored, init_val, buffers)
    loop = Loop(
        cond_fun,
        body_fun,
        init_val,
        max_steps,
        buffers,
        names=names,
        check_buffers=check_buffers,
    )
    del cond_fun, body_fun, buffers
    if kind not in KINDS:
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}."
        )

    def run():
        if kind == "lax":
            final = lax_while_loop(loop)
        elif kind == "checkpointed":
            final = checkpointed_while_loop(loop, checkpoints=checkpoints)
        else:
            final = bounded_while_loop(loop, base=base)
        return loop.final_value(final.value)

    return reporting_contract_errors(check_buffers, init_val, run)
