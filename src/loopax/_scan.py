"""`loopax.scan`: `jax.lax.scan` with a bounded-memory, optimally recomputing gradient.

The scan is rewritten as a while loop over the carry: step `i` (the loop's own step
counter, `Loop(body_takes_step=True)`) reads `xs[i]` (`xs[length - 1 - i]` when
`reverse`) and calls `f`. With `kind="checkpointed"` each
step's `y` is a per-step output of the checkpointed loop, stacked by the loop itself
(never stored in checkpoints; in reverse mode each step reads its own row of the
cotangent, as in `lax.scan`). With `kind="lax"` the loop carries preallocated stacked
outputs `ys` as buffers and writes `y` at the same index. Because the trip count is
known before the loop starts, the forward
sweep of the checkpointed kind stores states where revolve's first sweep would
(`revolve_forward_slots`), and the whole gradient recomputes exactly the offline
optimum.
"""

import operator
from collections.abc import Callable
from typing import Any, Literal, SupportsIndex, TypeVar

import jax.numpy as jnp
import jax.tree_util as jtu

from ._backends.checkpointed import checkpointed_while_loop
from ._backends.lax import lax_while_loop
from ._buffer import Buffer, buffer_at_set
from ._jax_internals import output_avals, row_struct, zeros
from ._planning import checkpoints_for_budget
from ._schedule import default_checkpoints, revolve_forward_slots
from ._state import Loop
from ._while_loop import buffer_names, check_loop_options


def _scan_names(f: Any) -> Callable[[Any], str | None]:
    """`names` for the scan's `Loop` over `(init, ys)` or `(init,)`: the user's buffers
    in `init` are named after `init` (or as `f` says); the stacked outputs `ys`, which
    the scan itself writes once per row, have no name (and are not checked)."""
    names = buffer_names(f, "init")

    def scan_names(path):
        if path and path[0] == jtu.SequenceKey(0):
            return names(path[1:])
        return None

    return scan_names


_Carry = TypeVar("_Carry")
_X = TypeVar("_X")
_Y = TypeVar("_Y")

SCAN_KINDS = ("lax", "checkpointed")

_REVERSE_MODE_ERROR = (
    "Reverse-mode differentiation (grad, vjp, jacrev, linearize) is not supported "
    "by `loopax.scan(..., kind='lax')`, which runs as a plain `lax.while_loop` and "
    "supports forward mode (jvp, jacfwd) only. Use kind='checkpointed' (optionally "
    "with `checkpoints=`), or `jax.lax.scan` to store every step."
)


def _describe(x: Any) -> str:
    return f"{jnp.result_type(x)}{list(jnp.shape(x))}"


def _scan_length(xs: Any, length: Any) -> int:
    """The number of steps: the common leading length of `xs`, or `length`."""
    if length is not None:
        if isinstance(length, bool) or not isinstance(length, SupportsIndex):
            raise TypeError(
                f"`length` must be a non-negative integer or None, got {length!r}. "
                "Pass the number of steps as a static Python int."
            )
        try:
            length = operator.index(length)
        except TypeError as e:  # e.g. a traced integer.
            raise TypeError(
                f"`length` must be a static Python int, got {length!r}. A scan's "
                "length must be known when it is traced; for a traced trip count use "
                "`loopax.fori_loop` or `loopax.while_loop`."
            ) from e
        if length < 0:
            raise ValueError(
                f"`length` must be a non-negative integer or None, got {length}."
            )
    paths = jtu.tree_flatten_with_path(xs)[0]
    lengths = {}
    for path, leaf in paths:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                "Every array in `xs` must have a leading axis to scan over, but "
                f"xs{jtu.keystr(path)} is a scalar ({_describe(leaf)}). Stack the "
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


def _check_f_output(init: Any, out: Any) -> Any:
    """Check that `f` returned `(carry, y)` with the carry matching `init`; return
    the `y` part."""
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError(
            "`f` must return a pair `(carry, y)`, as for `jax.lax.scan`, but it "
            f"returned {jtu.tree_structure(out)}."
        )
    carry, y = out
    want = [
        (jtu.keystr(p), _describe(x)) for p, x in jtu.tree_flatten_with_path(init)[0]
    ]
    got = [
        (jtu.keystr(p), _describe(x)) for p, x in jtu.tree_flatten_with_path(carry)[0]
    ]
    if jtu.tree_structure(init) != jtu.tree_structure(carry) or want != got:
        raise TypeError(
            "`f` must return a carry with the same structure, shapes and dtypes as "
            f"`init`:\n  init:   {want}\n  output: {got}\nCast the outputs to the "
            "input dtypes (e.g. `x.astype(old.dtype)`) and keep the same pytree "
            "structure."
        )
    return y


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
    final carry and the stacked outputs. Reverse mode through `lax.scan` stores every
    step; here it stores at most `checkpoints` carries (besides `init`) and recomputes
    the rest, as few of them as possible: as the number of steps $n$ is known up front,
    the checkpoints are placed by Griewank and Walther's revolve, and one gradient
    evaluates `f` $n$ times forward, $n$ times in VJPs and recomputes $t(n + 1, c + 1)
    - n$ steps, where $t(l, s) = r l - \beta(s + 1, r - 1)$ is revolve's optimum,
    $\beta(s, r) = \binom{s + r}{s}$ and $r$ the smallest integer with $\beta(s, r)
    \geq l$ (see [`loopax.schedule`][] with `known_length=True`). The stacked outputs
    are written in place, one row per step, and are never stored in checkpoints.

    Both kinds support `jit`, `vmap` and forward mode (`jvp`, `jacfwd`: one loop, no
    checkpoints); reverse mode (`grad`, `vjp`, `jacrev`, and so `jax.hessian`) needs
    `kind="checkpointed"`, as in [What each kind supports](../index.md#what-each-kind-supports).
    The algorithm is in [How checkpointing works](../how-it-works.md) (see its
    References).

    **Arguments:**

    - `f`: `(carry, x) -> (carry, y)`; the carry keeps its structure, shapes and
        dtypes.
    - `init`: the initial carry, any pytree of arrays (or array-likes).
    - `xs`: the inputs to scan over, a pytree of arrays with a common leading length,
        or `None` (then `f` gets `None` and `length` is required).
    - `length`: the number of steps, a static int; optional when `xs` has arrays.
    - `reverse`: if True, step `i` reads `xs[length - 1 - i]` and writes
        `ys[length - 1 - i]`, as `jax.lax.scan(..., reverse=True)`.
    - `kind`: `"checkpointed"` (default) or `"lax"`; see above.
    - `checkpoints`: for `kind="checkpointed"`, how many carries the backward pass may
        store besides `init`: a positive int, `"all"` to store every step (no
        recomputation, the memory of `lax.scan`), `"auto"` with `memory_budget` for
        as many as fit the budget, or `None` (default) for
        $\max(1, \lceil \log_2(n + 1) \rceil)$. Ignored by `kind="lax"`.
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
    if not callable(f):
        raise TypeError(f"`f` must be callable, `(carry, x) -> (carry, y)`, got {f!r}.")
    if not isinstance(kind, str) or kind not in SCAN_KINDS:
        raise ValueError(
            f"`kind` must be 'lax' or 'checkpointed' for `loopax.scan`, got {kind!r}. "
            "Use kind='checkpointed' for reverse mode with a fixed memory budget "
            "(the length of a scan is known, so kind='bounded' has nothing to add), "
            "or kind='lax' for forward mode only."
        )
    if not isinstance(reverse, bool):
        raise TypeError(f"`reverse` must be a bool, got {reverse!r}.")
    xs = jtu.tree_map(jnp.asarray, xs)
    num_steps = _scan_length(xs, length)
    check_loop_options(
        kind=kind,
        max_steps=num_steps,
        checkpoints=checkpoints,
        base=16,
        buffers=buffers,
        memory_budget=memory_budget,
        allow_all=True,
        check_buffers=check_buffers,
    )
    del length
    init = jtu.tree_map(jnp.asarray, init)
    if isinstance(checkpoints, str) and checkpoints == "auto":  # With `memory_budget`.
        assert memory_budget is not None
        checkpoints = None
        if kind == "checkpointed":
            checkpoints = checkpoints_for_budget(
                init, memory_budget, buffers=buffers, max_steps=num_steps
            )
    del memory_budget
    x_struct = jtu.tree_map(row_struct, xs)
    y_struct = output_avals(lambda c, x: _check_f_output(c, f(c, x)), init, x_struct)
    # Typed like `y` (sharding, varying mesh axes), one unsharded row per step.
    ys = jtu.tree_map(lambda y: zeros(y, (num_steps,)), y_struct)
    if num_steps == 0:  # Nothing to run (and no row of `xs` to trace `f` with).
        return init, ys

    def cond_fun(c):
        # The loop's own step counter (`body_takes_step`) runs to `max_steps`.
        del c
        return jnp.array(True)

    def step(i, carry):
        """Step `i` of the scan: the new carry, the output `y` and its row."""
        index = num_steps - 1 - i if reverse else i
        carry, y = f(carry, jtu.tree_map(lambda a: a[index], xs))
        return carry, y, index

    user_buffers = buffers
    names = _scan_names(f)
    del buffers
    if kind == "lax":
        return _scan_with_ys_in_carry(
            cond_fun, step, init, ys, num_steps, user_buffers, names, check_buffers
        )
    if kind != "checkpointed":
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, SCAN_KINDS))}, got {kind!r}."
        )
    if checkpoints is None:
        checkpoints = default_checkpoints(num_steps)
    elif checkpoints == "all":
        checkpoints = max(num_steps, 1)
    assert isinstance(checkpoints, int)
    table = (
        revolve_forward_slots(num_steps, checkpoints)
        if checkpoints < num_steps
        else None
    )
    # The outputs are per-step outputs of the loop (not a carried buffer): reverse mode
    # then reads one row of their cotangent per step, as `lax.scan` does.
    outputs = []

    def body_fun(i, c):
        (carry,) = c
        carry, y, _ = step(i, carry)
        outputs.append(y)
        return (carry,)

    loop = Loop(
        cond_fun,
        body_fun,
        (init,),
        num_steps,
        None if user_buffers is None else lambda c: user_buffers(c[0]),
        check_names=names if check_buffers else None,
        names=names,
        body_takes_step=True,
    )
    final, ys = checkpointed_while_loop(
        loop,
        checkpoints=checkpoints,
        forward_slots=table,
        step_outputs=lambda: outputs.pop(),
    )
    if reverse:  # Row k holds step k's output, which belongs at row n - 1 - k.
        ys = jtu.tree_map(lambda a: a[::-1], ys)
    (carry,) = loop.final_value(final.value)
    return carry, ys


def _scan_with_ys_in_carry(
    cond_fun, step, init, ys, num_steps, user_buffers, names, check_buffers
):
    """`kind="lax"`: the outputs are buffers in the carry of a `lax.while_loop`."""

    def body_fun(i, c):
        carry, ys = c
        carry, y, index = step(i, carry)
        ys = jtu.tree_map(
            lambda buf, v: buffer_at_set(buf, index, v),
            ys,
            y,
            is_leaf=lambda b: isinstance(b, Buffer),
        )
        return carry, ys

    def loop_buffers(c):
        return (None if user_buffers is None else user_buffers(c[0])), c[1]

    loop = Loop(
        cond_fun,
        body_fun,
        (init, ys),
        num_steps,
        loop_buffers,
        check_names=names if check_buffers else None,
        names=names,
        body_takes_step=True,
    )
    final = lax_while_loop(loop, reverse_mode_error=_REVERSE_MODE_ERROR)
    carry, ys = loop.final_value(final.value)
    return carry, ys
