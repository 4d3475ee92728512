"""The loop-state rewrite that every backend runs.

A user loop `(cond_fun, body_fun, init_val)` becomes a loop over
`LoopState(step, value)`:

- `step` counts body calls, so backends can enforce `max_steps` and checkpoint
  schedules can be keyed on it. It is never batched.
- The predicate `keep_going = cond_fun(value) & (step < max_steps)` may be batched under
  `vmap`. `Loop.cond` reduces it to one unbatched flag, so backends never see a batched
  predicate and the whole batch shares one step counter and one checkpoint schedule.
  `Loop.body` evaluates it again to freeze finished batch elements; outside `vmap` that
  second evaluation is dead code (the freeze folds away) and XLA removes it. It is
  recomputed rather than carried because a carried flag hides the loop's induction
  variable from XLA, which then cannot compile a counted loop (measured: ~0.5 us of
  extra overhead per step on CPU for a trivial body).
- `value` is the user's carry with every `Buffer` unwrapped to its array; `Loop.body`
  wraps the buffer leaves around `body_fun` and unwraps them after, and checks that
  `body_fun` returned the structure, shapes and dtypes it was given.
- With `check_buffers=True`, `value` is `(carry, written)` instead:
  `written` holds one boolean mask per checked buffer (see `_check_buffers.py`), as
  ordinary (non-buffer) leaves, so backends store and restore them with the rest of
  the state. Without it nothing changes.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree

from ._buffer import Buffer, and_pred
from ._jax_internals import is_weakly_typed, with_weak_type
from ._unvmap import active_mask, unvmap_any
from ._validate import Names, carry_mismatch_message, describe


SCALAR_BUFFER = (
    "`buffers=` selected `{name}`, a scalar ({description}), but a buffer must have at "
    "least one axis: the body writes it one entry at a time (`buf.at[i].set(x)`), and "
    "a 0-d array has no entries to index. Do not select it in `buffers=`: keep step "
    "counters and other scalars in the ordinary carry, and select only the arrays the "
    "body fills entry by entry, e.g. `buffers=lambda carry: carry[1]`."
)


class LoopState(NamedTuple):
    step: Int[Array, ""]
    value: PyTree[Array]


def _is_buffer(x: Any) -> bool:
    return isinstance(x, Buffer)


class _LeafMarker:
    """Stands in for carry leaf `index` when we ask `buffers(...)` what it selects."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<carry leaf {self.index}>"


def _select_buffer_leaves(
    buffers: Callable[[Any], Any], treedef, num_leaves: int
) -> set[int]:
    markers = jtu.tree_unflatten(treedef, [_LeafMarker(i) for i in range(num_leaves)])
    try:
        selected = buffers(markers)
    except Exception as e:
        raise TypeError(
            "`buffers` must be a function that takes the carry and returns some of its "
            "arrays (a node, or a sequence of nodes, of the carry); calling it failed "
            f"with: {e!r}"
        ) from e
    indices = set()
    for leaf in jtu.tree_leaves(selected, is_leaf=lambda x: isinstance(x, _LeafMarker)):
        if not isinstance(leaf, _LeafMarker):
            raise ValueError(
                "`buffers` must return arrays of the carry (a node, or a sequence "
                f"of nodes, of the carry it is given), but it returned {leaf!r}, "
                "which is not part of the carry. Return the carry's own arrays, e.g. "
                "`buffers=lambda carry: carry[1]`."
            )
        indices.add(leaf.index)
    return indices


# `while_loop`'s own argument names, for loops whose carry is the user's.
_USER_NAMES = Names()


class Loop:
    """A user loop rewritten over `LoopState`; see the module docstring.

    **Arguments:**

    - `cond_fun`, `body_fun`: as `jax.lax.while_loop`.
    - `init_val`: the (already `jnp.asarray`-normalised) initial carry.
    - `max_steps`: the maximum number of body calls, or `None` for no bound.
    - `buffers`: as `loopax.while_loop`, or `None`.
    - `names`: how errors name the user's functions and carry (`_validate.Names`).
    - `check_buffers`: check this loop's buffers at run time (`check_buffers=True`).
    - `body_takes_step`: call `body_fun(step, carry, *xs)` with the loop's own step
        counter (`loopax.scan` indexes its inputs with it instead of carrying a second
        counter, which every checkpoint would store and every recomputation advance).
    - `xs`: example per-step inputs (e.g. `jax.ShapeDtypeStruct`s): `Loop.body(state,
        *xs)` passes them on to `body_fun` after the carry.
    - `has_outputs`: `body_fun` returns `(carry, y)`, as a scan's step does;
        `Loop.body` then returns `(state, y)` and `output_struct` describes `y`.

    Types follow `lax.while_loop` exactly. A weakly typed leaf of `init_val` (a
    Python scalar) whose dtype differs from what the body returns is promoted first,
    as `lax` does; `cond_fun` and `body_fun` see each leaf with the weak type `lax`
    would give it; and `final_value` carries the weak types of the body's output.
    Backends see strongly typed leaves only. Finding the promotions and output weak
    types traces the body once more (`jax.eval_shape`) only when a leaf of
    `init_val` is weakly typed or `has_outputs`; otherwise nothing is promoted and
    the output weak types are read from the backend's trace of `body`.
    """

    def __init__(
        self,
        cond_fun: Callable,
        body_fun: Callable,
        init_val: PyTree[Any],
        max_steps: int | None,
        buffers: Callable[[Any], Any] | None,
        *,
        names: Names = _USER_NAMES,
        check_buffers: bool = False,
        body_takes_step: bool = False,
        xs: Sequence[Any] = (),
        has_outputs: bool = False,
    ):
        leaves, treedef = jtu.tree_flatten(init_val, is_leaf=_is_buffer)
        self._treedef = treedef
        selected = (
            set()
            if buffers is None
            else _select_buffer_leaves(buffers, treedef, len(leaves))
        )
        self._was_buffer = tuple(_is_buffer(x) for x in leaves)
        # `is_buffer[i]`: carry leaf i is a write-once buffer of *this* loop: the body
        # sees it as a `Buffer` and backends may keep it out of checkpoints. Buffers of
        # an outer loop that are not buffers here are still shown to the body as
        # `Buffer`s.
        is_buffer = tuple(i in selected for i in range(len(leaves)))
        self._show_as_buffer = tuple(
            a or b for a, b in zip(self._was_buffer, is_buffer, strict=True)
        )
        # The write masks of outer loops' `Buffer`s: kept on every write in this loop.
        self._outer_pred = tuple(_buffer_pred(x) for x in leaves)
        self.cond_fun = cond_fun
        self.body_fun = body_fun
        self.names = names
        self._body_takes_step = body_takes_step
        self.has_outputs = has_outputs
        self.max_steps = max_steps
        # `_checked`: carry leaf index -> buffer name, in leaf order (check_buffers).
        paths_leaves = jtu.tree_flatten_with_path(init_val, is_leaf=_is_buffer)[0]
        self._checked, masks = _checked_buffers(
            paths_leaves, is_buffer, names if check_buffers else None
        )
        # Each leaf's name in errors: its path in the user's carry (`init_val['out']`),
        # or in the loop's for a leaf the front end added.
        self._names = tuple(
            names.leaf_name(p) or "carry" + jtu.keystr(p) for p, _ in paths_leaves
        )
        for i in sorted(selected):
            leaf = _unwrap(leaves[i])
            if jnp.ndim(leaf) == 0:
                raise ValueError(
                    SCALAR_BUFFER.format(
                        name=self._names[i], description=describe(leaf)
                    )
                )
        unwrapped = [_unwrap(x) for x in leaves]
        self._in_weak = tuple(is_weakly_typed(x) for x in unwrapped)
        value = self._join(jtu.tree_unflatten(treedef, unwrapped), dict(masks))
        self.is_buffer = (*is_buffer, *(False for _ in masks))
        # Promote weakly typed leaves as `lax.while_loop` does, then read the weak
        # types of the body's output. With strong inputs only nothing is promoted,
        # and the weak types are read when the backend traces `body` (`None` until).
        self._out_weak: tuple[bool, ...] | None = None
        self.output_struct = None
        if has_outputs or any(self._in_weak):
            carry, ys = self._trace_body(value, xs)
            promoted = [
                _promote_weak(x, w, new)
                for x, w, new in zip(unwrapped, self._in_weak, carry, strict=True)
            ]
            if any(p is not x for p, x in zip(promoted, unwrapped, strict=True)):
                self._in_weak = tuple(is_weakly_typed(x) for x in promoted)
                unwrapped = promoted
                value = self._join(jtu.tree_unflatten(treedef, unwrapped), dict(masks))
                carry, ys = self._trace_body(value, xs)
            self._out_weak = tuple(is_weakly_typed(x) for x in carry)
            self.output_struct = ys
        # Backends see strong types only; `_as_user_carry` gives the user's back.
        self.init_value = jtu.tree_map(lambda x: with_weak_type(x, False), value)

    @property
    def written_through_buffers(self) -> tuple[bool, ...]:
        """Per leaf of `init_value`: whether the body sees it as a `Buffer` (this
        loop's buffers and outer loops'), i.e. may write it with buffer writes."""
        return (*self._show_as_buffer, *(False for _ in self._checked))

    def _trace_body(self, value: PyTree[Array], xs: Sequence[Any]) -> tuple:
        """The body's output types for the carry `value`: `(carry leaves, y)`, checked
        against `value` up to the promotion of weakly typed leaves."""

        def run(value, *xs):
            carry = self._as_user_carry(value, self._show_as_buffer, weak=False)
            out, y = self._call_body(jnp.array(0, jnp.int32), carry, xs)
            given = self._split(value)[0]
            out = jtu.tree_map(_unwrap, out, is_leaf=_is_buffer)
            self._check_output(given, out, weak=is_weakly_typed)
            return self._treedef.flatten_up_to(out), y

        structs = jax.eval_shape(run, value, *xs)
        return structs

    # -- check_buffers=True ------------------------------------------------------------

    def _split(self, value: PyTree[Array]) -> tuple[PyTree[Array], dict[int, Array]]:
        """`value` as `(carry, {checked leaf index: written mask})`."""
        if not self._checked:
            return value, {}
        carry, masks = value
        return carry, dict(zip(self._checked, masks, strict=True))

    def _join(self, carry: PyTree[Array], written: dict[int, Array]) -> PyTree[Array]:
        if not self._checked:
            return carry
        return carry, tuple(written[i] for i in self._checked)

    def _written_after(self, out: PyTree[Any], written: dict[int, Array]) -> dict:
        """The masks after the body: those of the checked `Buffer`s it returned."""
        if not written:
            return written
        out_leaves = jtu.tree_leaves(out, is_leaf=_is_buffer)
        new = {}
        for i, old in written.items():
            leaf = _outer_checked(out_leaves[i])
            new_mask = None if leaf is None else leaf._written
            same = new_mask is not None and jnp.shape(new_mask) == jnp.shape(old)
            new[i] = new_mask if same else old
        return new

    # -- the carry as the user sees it ------------------------------------------------

    def _as_user_carry(
        self,
        value: PyTree[Array],
        show: Sequence[bool],
        mask: Bool[Array, ""] | None = None,
        *,
        weak: bool = True,
    ) -> PyTree[Any]:
        """The carry with `Buffer`s where `show` says; their writes are masked by
        `mask` (this loop's active batch elements) and by the outer loops' masks.
        With `weak`, each leaf has the weak type `lax` would give it."""
        value, written = self._split(value)
        leaves = self._treedef.flatten_up_to(value)
        if weak:
            leaves = [
                with_weak_type(x, w) for x, w in zip(leaves, self._in_weak, strict=True)
            ]
        return jtu.tree_unflatten(
            self._treedef,
            [
                (
                    Buffer(
                        x,
                        and_pred(p, mask),
                        written.get(i),
                        self._checked.get(i),
                        self._names[i],
                    )
                    if s
                    else x
                )
                for i, (x, s, p) in enumerate(
                    zip(leaves, show, self._outer_pred, strict=True)
                )
            ],
        )

    def final_value(self, value: PyTree[Array]) -> PyTree[Any]:
        """The carry to return to the user: the weak types `lax.while_loop` would
        give, outer loops' `Buffer`s wrapped back up."""
        if self._out_weak is None:  # A backend that never traced `body`.
            carry, _ = self._trace_body(self.init_value, ())
            self._out_weak = tuple(map(is_weakly_typed, carry))
        value, written = self._split(value)
        leaves = [
            with_weak_type(x, w)
            for x, w in zip(
                self._treedef.flatten_up_to(value), self._out_weak, strict=True
            )
        ]
        value = self._join(jtu.tree_unflatten(self._treedef, leaves), written)
        return self._as_user_carry(value, self._was_buffer, weak=False)

    def final_outputs(self, ys: PyTree[Array]) -> PyTree[Array]:
        """Stacked per-step outputs with the weak types of the body's outputs."""
        assert self.has_outputs
        return jtu.tree_map(
            lambda y, s: with_weak_type(y, is_weakly_typed(s)), ys, self.output_struct
        )

    # -- predicate ---------------------------------------------------------------------

    def _call_cond(self, value: PyTree[Array]) -> Bool[Array, ""]:
        pred = self.cond_fun(self._as_user_carry(value, self._show_as_buffer))
        if not (
            hasattr(pred, "dtype")
            or isinstance(pred, bool | int | float | complex | np.generic)
        ) or not (jnp.shape(pred) == () and jnp.result_type(pred) == jnp.bool_):
            raise TypeError(
                f"`{self.names.cond}` must return a boolean scalar, but it returned "
                f"{describe(pred)}. Return e.g. `carry[0] < 10` (a `bool[]` array), "
                "not an array of several booleans or a number."
            )
        return jnp.asarray(pred)

    def _keep_going(
        self, step: Int[Array, ""], value: PyTree[Array]
    ) -> Bool[Array, ""]:
        pred = self._call_cond(value)
        if self.max_steps is not None:
            pred = pred & (step < self.max_steps)
        return pred

    def init(self) -> LoopState:
        return LoopState(jnp.array(0, dtype=jnp.int32), self.init_value)

    def cond(self, state: LoopState) -> Bool[Array, ""]:
        """Whether any batch element continues: one unbatched flag."""
        return unvmap_any(self._keep_going(state.step, state.value))

    # -- body --------------------------------------------------------------------------

    def _call_body(self, step: Int[Array, ""], carry: PyTree[Any], xs: Sequence[Any]):
        """`body_fun` on the user's carry: `(carry, y)` (`y` is `None` without
        `has_outputs`), each leaf this loop showed as a `Buffer` checked to come back
        as one."""
        args = (step, carry, *xs) if self._body_takes_step else (carry, *xs)
        out = self.body_fun(*args)
        y = None
        if self.has_outputs:
            out, y = out
        if jtu.tree_structure(out, is_leaf=_is_buffer) == self._treedef:
            for name, shown, leaf in zip(
                self._names,
                self._show_as_buffer,
                self._treedef.flatten_up_to(out),
                strict=True,
            ):
                if shown and not _is_buffer(leaf):
                    raise TypeError(
                        f"`{self.names.body}` returned a plain array for the buffer "
                        f"{name} (selected by `buffers=`), which must "
                        "come back as the `loopax.Buffer` it was given: return the "
                        "Buffer that `buf.at[i].set(x)` gives (or `buf` itself), not "
                        "an array computed from it."
                    )
        return out, y

    def _check_output(self, given: PyTree[Any], out: PyTree[Any], *, weak) -> None:
        """Raise a `TypeError` showing both carries line by line if `out` differs from
        `given` (the user's part, named as the user knows it; the front end builds
        the rest)."""
        part = self.names.user_part
        message = carry_mismatch_message(self.names, part(given), part(out), weak=weak)
        if message is None:  # A leaf the front end added: a bug in loopax.
            message = carry_mismatch_message(
                Names(body="<loopax front end>", carry="<loop carry>"),
                given,
                out,
                weak=weak,
            )
        if message is not None:
            raise TypeError(message)

    def body(self, state: LoopState, *xs: Any) -> Any:
        """One step: `body_fun`, checked, with finished batch elements frozen; with
        `has_outputs`, `(state, y)`.

        Buffers are frozen by masking their writes (see `Buffer._pred`), the other
        leaves by a `select` after the body; outside `vmap` both fold away."""
        mask = active_mask(self._keep_going(state.step, state.value))
        carry = self._as_user_carry(state.value, self._show_as_buffer, mask)
        out, y = self._call_body(state.step, carry, xs)
        value, written = self._split(state.value)
        unwrapped = jtu.tree_map(_unwrap, out, is_leaf=_is_buffer)
        self._check_output(value, unwrapped, weak=lambda _: False)
        written = self._written_after(out, written)
        out = unwrapped
        values, treedef = jtu.tree_flatten(value)
        if self._out_weak is None:
            self._out_weak = tuple(map(is_weakly_typed, treedef.flatten_up_to(out)))
        new_leaves = [
            jnp.asarray(new, old.dtype)
            if shown
            else lax.select(mask, jnp.asarray(new, old.dtype), old)
            for new, old, shown in zip(
                treedef.flatten_up_to(out), values, self._show_as_buffer, strict=True
            )
        ]
        new_value = self._join(jtu.tree_unflatten(treedef, new_leaves), written)
        new_state = LoopState(state.step + 1, new_value)
        return (new_state, y) if self.has_outputs else new_state


def _checked_buffers(
    paths_leaves: Sequence[tuple[Any, Any]],
    is_buffer: Sequence[bool],
    names: Names | None,
) -> tuple[dict[int, str], list[tuple[int, Array]]]:
    """The checked buffers and their initial `written` masks, `({leaf index: name},
    [(leaf index, mask)])`.

    Checked are: the buffers of this loop when `names` is given (`check_buffers=True`),
    named after their path in the user's carry (leaves a front end added are not
    checked), starting with nothing written; and every `Buffer` of an outer loop that
    is checked there, continuing with its mask, whatever this loop's setting."""
    checked: dict[int, str] = {}
    masks = []
    for i, (path, leaf) in enumerate(paths_leaves):
        outer = _outer_checked(leaf)
        if outer is not None:
            checked[i] = outer._name or "<buffer>"
            masks.append((i, outer._written))
        elif names is not None and is_buffer[i]:
            name = names.leaf_name(path)
            if name is not None:
                checked[i] = name
                masks.append((i, jnp.zeros(jnp.shape(_unwrap(leaf)), jnp.bool_)))
    return checked, masks


def _promote_weak(x: Array, weak: bool, new: Any) -> Array:
    """`x` promoted as `lax.while_loop` promotes a weakly typed initial value whose
    dtype differs from the body's output `new` (a `jax.ShapeDtypeStruct`)."""
    if not weak or (jnp.shape(x) == new.shape and x.dtype == new.dtype):
        return x
    example = with_weak_type(jnp.zeros((), new.dtype), is_weakly_typed(new))
    try:
        dtype = jnp.result_type(x, example)
    except jax.dtypes.TypePromotionError:
        return x  # Strict promotion: the body's output check says what differs.
    return lax.convert_element_type(x, dtype)


def _buffer_pred(x: Any) -> Bool[Array, ""] | None:
    pred = None
    while isinstance(x, Buffer):
        pred, x = and_pred(pred, x._pred), x._array
    return None if pred is True else pred


def _outer_checked(x: Any) -> Buffer | None:
    """The outermost `Buffer` around `x` if it is checked (`check_buffers=True`)."""
    if isinstance(x, Buffer) and x._written is not None:
        return x
    return None


def _unwrap(x: Any) -> Any:
    while isinstance(x, Buffer):
        x = x._array
    return x
