"""`loopax.scan`: `jax.lax.scan` with a bounded-memory, optimally recomputing gradient.

The scan is rewritten as a `Loop` over the carry whose body returns per-step outputs
(`Loop(has_outputs=True)`). With `kind="lax"` it runs as a plain `lax.scan` of that
body (reverse-mode differentiable by storing every step, as `lax.scan` is). With
`kind="checkpointed"` step `i` (the loop's own step counter,
`Loop(body_takes_step=True)`) reads `xs[i]` (`xs[length - 1 - i]` when `reverse`) and
calls `f`; each step's `y` is a per-step output of the checkpointed loop, stacked by
the loop itself (never stored in checkpoints; in reverse mode each step reads its own
row of the cotangent, as in `lax.scan`). Because the trip count is known before the
loop starts, the forward sweep of the checkpointed kind stores states where revolve's
first sweep would (`revolve_forward_slots`), and the whole gradient recomputes exactly
the offline optimum.
"""

from collections.abc import Callable
from typing import Any, Literal, TypeVar

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._backends.checkpointed import checkpointed_while_loop
from ._check_buffers import reporting_contract_errors
from ._jax_internals import row_struct
from ._schedule import default_checkpoints, revolve_forward_slots
from ._state import Loop
from ._validate import (
    Names,
    check_bool,
    check_callable,
    check_int,
    check_loop_options,
    describe,
)
from ._while_loop import check_checkpoints_fit, checkpoints_from_budget


_Carry = TypeVar("_Carry")
_X = TypeVar("_X")
_Y = TypeVar("_Y")

SCAN_KINDS = ("lax", "checkpointed")


def _scan_length(xs: Any, length: Any) -> int:
    """The number of steps: the common leading length of `xs`, or `length`."""
    if length is not None:
        try:
            length = check_int(
                "length",
                length,
                minimum=0,
                optional=True,
                hint="Pass the number of steps as a static Python int.",
            )
        except TypeError as e:
            if not isinstance(length, jax.Array):  # A tracer.
                raise
            raise TypeError(
                f"`length` must be a static Python int, got {length!r}. A scan's "
                "length must be known when it is traced; for a traced trip count use "
                "`loopax.fori_loop` or `loopax.while_loop`."
            ) from e
    paths = jtu.tree_flatten_with_path(xs)[0]
    lengths = {}
    for path, leaf in paths:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                "Every array in `xs` must have a leading axis to scan over, but "
                f"xs{jtu.keystr(path)} is a scalar ({describe(leaf)}). Stack the "
                "per-step inputs along axis 0."
            )
        lengths[jtu.keystr(path)] = shape[0]
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"xs{p or ''}: {n}" for p, n in lengths.items())
        raise ValueError(
            "All arrays in `xs` must have the same leading length (the number of "
            f"steps), got {detail}. Give every array in `xs` one entry per step."
        )
    if lengths:
        (xs_length,) = set(lengths.values())
        if length is not None and length != xs_length:
            raise ValueError(
                f"`length={length}` does not match the leading length {xs_length} of "
                "the arrays in `xs`. Pass `length=None` (it is taken from `xs`) or "
                f"`length={xs_length}`."
            )
        return xs_length
    if length is None:
        raise ValueError(
            "`loopax.scan` needs `length` when `xs` is None (or holds no arrays): "
            "pass `length=` the number of steps, e.g. `length=100`."
        )
    return length


def scan(
    f: Callable[[_Carry, _X], tuple[_Carry, _Y]],
    init: _Carry,
    xs: _X | None = None,
    length: int | None = None,
    *,
    reverse: bool = False,
    kind: Literal["lax", "checkpointed"] = "checkpointed",
    checkpoints: int | Literal["all", "auto"] | None = None,
    memory_budget: int | str | None = None,
    buffers: Callable[[_Carry], Any] | None = None,
    check_buffers: bool = False,
) -> tuple[_Carry, _Y]:
    r"""A `jax.lax.scan` whose gradient stores only `checkpoints` carries.

    Returns exactly what `lax.scan(f, init, xs, length, reverse=reverse)` returns: the
    final carry and the stacked outputs, with the same dtypes and weak types. Reverse mode through `lax.scan` stores every
    step; here it stores at most `checkpoints` carries (besides `init`) and recomputes
    the rest, as few of them as possible: as the number of steps $n$ is known up front,
    the checkpoints are placed by Griewank and Walther's revolve, and one gradient
    evaluates `f` $n$ times forward, $n$ times in VJPs and recomputes $t(n + 1, c + 1)
    - n$ steps, where $t(l, s) = r l - \beta(s + 1, r - 1)$ is revolve's optimum,
    $\beta(s, r) = \binom{s + r}{s}$ and $r$ the smallest integer with $\beta(s, r)
    \geq l$ (see [`loopax.schedule`][] with `known_length=True`). The stacked outputs
    are written in place, one row per step, and are never stored in checkpoints.

    Both kinds support `jit`, `vmap` and forward mode (`jvp`, `jacfwd`: one loop, no
    checkpoints). Reverse mode (`grad`, `vjp`, `jacrev`, and so `jax.hessian`):
    `kind="checkpointed"` stores `checkpoints` carries and recomputes the rest
    optimally; `kind="lax"` is a plain `lax.scan`, which stores every step. See
    [What each kind supports](../index.md#what-each-kind-supports). The algorithm is
    in [How checkpointing works](../how-it-works.md) (see its References).

    **Arguments:**

    - `f`: `(carry, x) -> (carry, y)`; the carry keeps its structure, shapes and
        dtypes.
    - `init`: the initial carry, any pytree of arrays (or array-likes).
    - `xs`: the inputs to scan over, a pytree of arrays with a common leading length,
        or `None` (then `f` gets `None` and `length` is required).
    - `length`: the number of steps, a static int; optional when `xs` has arrays.
    - `reverse`: if True, step `i` reads `xs[length - 1 - i]` and writes
        `ys[length - 1 - i]`, as `jax.lax.scan(..., reverse=True)`.
    - `kind`: `"checkpointed"` (default) or `"lax"` (a plain `lax.scan`); see above.
    - `checkpoints`: for `kind="checkpointed"`, how many carries the backward pass may
        store besides `init`: a positive int, `"all"` to store every step (no
        recomputation, the memory of `lax.scan`), `"auto"` with `memory_budget` for
        as many as fit the budget, or `None` (default) for
        $\max(1, \lceil \log_2(n + 1) \rceil)$. Ignored by `kind="lax"` (which
        stores every step, as `lax.scan`).
    - `memory_budget`: with `checkpoints="auto"` only: the bytes the checkpoints may
        take, an int or a string such as `"2GiB"`; the number of checkpoints is the
        largest whose copies of the carry (buffers excluded) fit, at most `length`
        (then every step is stored), as [`loopax.checkpoints_for_budget`][].
    - `buffers`: a function from the carry to the arrays in it that `f` writes at most
        once per index, as for [`loopax.while_loop`][]; inside `f` they are
        [`loopax.Buffer`][]s.
    - `check_buffers`: if `True`, check at run time that `f` keeps the buffer
        contract on the arrays selected by `buffers` (a debugging aid; default
        `False`, at no cost), as for [`loopax.while_loop`][]. Buffers are named by
        their path in `init`, e.g. `init['out']`.

    **Returns:**

    A pair `(carry, ys)`: the final carry and the outputs `y` stacked along a new
    leading axis of length `length`.

    !!! warning

        Reading `xs` inside a gradient of the checkpointed kind gives each step a
        cotangent the size of `xs` that is added to the running total: the backward
        sweep costs $O(n \cdot |xs|)$ additions besides the VJPs. Keep `xs` small, or
        pass the inputs through the carry.
    """
    check_callable("f", f, "`(carry, x) -> (carry, y)`")
    if not isinstance(kind, str) or kind not in SCAN_KINDS:
        raise ValueError(
            f"`kind` must be 'lax' or 'checkpointed' for `loopax.scan`, got {kind!r}. "
            "Use kind='checkpointed' for reverse mode with a fixed memory budget "
            "(the length of a scan is known, so kind='bounded' has nothing to add), "
            "or kind='lax' for a plain `lax.scan` (its gradient stores every step)."
        )
    check_bool("reverse", reverse, "Pass reverse=True to scan from the last step.")
    xs = jtu.tree_map(jnp.asarray, xs)
    num_steps = _scan_length(xs, length)
    symbolic = jax.export.is_symbolic_dim(num_steps)
    if symbolic and kind != "lax":
        raise ValueError(
            f"`loopax.scan(kind={kind!r})` needs a length known at trace time, but the "
            f"length is the symbolic dimension {num_steps} (`jax.export`): its "
            "checkpoint schedule is planned for the length. Use kind='lax' (a plain "
            "`lax.scan`, whose gradient stores every step), or `loopax.fori_loop` "
            "with `upper` the symbolic dimension."
        )
    check_loop_options(
        kind=kind,
        max_steps=None if symbolic else num_steps,
        checkpoints=checkpoints,
        base=16,
        buffers=buffers,
        memory_budget=memory_budget,
        allow_all=True,
        check_buffers=check_buffers,
    )
    del length
    init = jtu.tree_map(jnp.asarray, init)
    checkpoints = checkpoints_from_budget(
        checkpoints, memory_budget, kind, init, buffers, num_steps
    )
    del memory_budget
    return run_scan(
        f,
        init,
        xs,
        num_steps,
        reverse=reverse,
        kind=kind,
        checkpoints=checkpoints,
        buffers=buffers,
        check_buffers=check_buffers,
        names=Names(body="f", carry="init"),
    )


def _always(carry: Any) -> Any:
    # The loop's step counter runs to `max_steps`, the scan's length.
    del carry
    return jnp.array(True)


def run_scan(
    f: Callable,
    init: Any,
    xs: Any,
    num_steps: int,
    *,
    reverse: bool,
    kind: str,
    checkpoints: int | str | None,
    buffers: Callable[[Any], Any] | None,
    check_buffers: bool,
    names: Names,
) -> tuple[Any, Any]:
    """`loopax.scan` after validation, with `names` for the errors (front ends that
    wrap the user's carry pass theirs)."""
    # One row of `xs`, typed like it (sharding over explicit axes, varying axes).
    x_struct = jtu.tree_map(row_struct, xs)

    def f_pair(carry, x):
        out = f(carry, x)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(
                f"`{names.body}` must return a pair `(carry, y)`, as for "
                f"`jax.lax.scan`, but it returned {jtu.tree_structure(out)}."
            )
        return tuple(out)

    if kind == "lax" or num_steps == 0:  # (No row of `xs` to index when n = 0.)
        loop = Loop(
            _always,
            f_pair,
            init,
            num_steps,
            buffers,
            names=names,
            check_buffers=check_buffers,
            xs=(x_struct,),
            has_outputs=True,
        )

        def run_lax():
            # `lax.scan` takes a symbolic length (`jax.export`) from `xs` only.
            length = None if jax.export.is_symbolic_dim(num_steps) else num_steps
            final, ys = lax.scan(
                loop.body, loop.init(), xs, length=length, reverse=reverse
            )
            return loop.final_value(final.value), loop.final_outputs(ys)

        return reporting_contract_errors(check_buffers, init, run_lax)
    if kind != "checkpointed":
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, SCAN_KINDS))}, got {kind!r}."
        )

    def step(i, carry):
        """Step `i` of the scan: `f` on row `i` of `xs` (`n - 1 - i` if `reverse`)."""
        index = num_steps - 1 - i if reverse else i
        return f_pair(carry, jtu.tree_map(lambda a: a[index], xs))

    loop = Loop(
        _always,
        step,
        init,
        num_steps,
        buffers,
        names=names,
        check_buffers=check_buffers,
        body_takes_step=True,
        has_outputs=True,
    )
    if checkpoints is None:
        checkpoints = default_checkpoints(num_steps)
    elif checkpoints == "all":
        checkpoints = max(num_steps, 1)
    assert isinstance(checkpoints, int)
    check_checkpoints_fit(min(checkpoints, num_steps), init, buffers)
    table = (
        revolve_forward_slots(num_steps, checkpoints)
        if checkpoints < num_steps
        else None
    )

    def run_checkpointed():
        final, ys = checkpointed_while_loop(
            loop, checkpoints=checkpoints, forward_slots=table
        )
        if reverse:  # Row k holds step k's output, which belongs at row n - 1 - k.
            ys = jtu.tree_map(lambda a: a[::-1], ys)
        return loop.final_value(final.value), loop.final_outputs(ys)

    return reporting_contract_errors(check_buffers, init, run_checkpointed)
