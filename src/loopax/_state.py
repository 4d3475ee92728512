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
- With `check_buffers=True` (`check_names`), `value` is `(carry, written)` instead:
  `written` holds one boolean mask per checked buffer (see `_check_buffers.py`), as
  ordinary (non-buffer) leaves, so backends store and restore them with the rest of
  the state. Without it nothing changes.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree

from ._buffer import Buffer, and_pred
from ._unvmap import active_mask, unvmap_any


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


class Loop:
    """A user loop rewritten over `LoopState`; see the module docstring.

    **Arguments:**

    - `cond_fun`, `body_fun`: as `jax.lax.while_loop`.
    - `init_val`: the (already `jnp.asarray`-normalised) initial carry.
    - `max_steps`: the maximum number of body calls, or `None` for no bound.
    - `buffers`: as `loopax.while_loop`, or `None`.
    - `check_names`: with `check_buffers=True`, the name of a buffer in errors of
        the run-time checks, from its key path in `init_val` (`None`: not checked).
    - `names`: the name of a buffer in other errors (selecting a scalar, using a
        buffer as an array), from its key path; default: `check_names`, else the path
        after `carry`.
    - `body_takes_step`: call `body_fun(step, carry)` with the loop's own step counter
        (`loopax.scan` indexes its inputs with it instead of carrying a second
        counter, which every checkpoint would store and every recomputation advance).
    """

    def __init__(
        self,
        cond_fun: Callable,
        body_fun: Callable,
        init_val: PyTree[Any],
        max_steps: int | None,
        buffers: Callable[[Any], Any] | None,
        *,
        check_names: Callable[[Any], str | None] | None = None,
        names: Callable[[Any], str | None] | None = None,
        body_takes_step: bool = False,
    ):
        leaves, self._treedef = jtu.tree_flatten(init_val, is_leaf=_is_buffer)
        selected = (
            set()
            if buffers is None
            else _select_buffer_leaves(buffers, self._treedef, len(leaves))
        )
        self._was_buffer = tuple(_is_buffer(x) for x in leaves)
        paths = [
            p for p, _ in jtu.tree_flatten_with_path(init_val, is_leaf=_is_buffer)[0]
        ]
        name_of = names or check_names
        self._names = tuple(
            (name_of(path) if name_of is not None else None)
            or "carry" + jtu.keystr(path)
            for path in paths
        )
        for i in sorted(selected):
            leaf = _unwrap(leaves[i])
            if jnp.ndim(leaf) == 0:
                raise ValueError(
                    SCALAR_BUFFER.format(
                        name=self._names[i], description=_describe(leaf)
                    )
                )
        # `is_buffer[i]`: carry leaf i is a write-once buffer of *this* loop: the body
        # sees it as a `Buffer` and backends may keep it out of checkpoints. Buffers of
        # an outer loop that are not buffers here are still shown to the body as
        # `Buffer`s.
        self.is_buffer = tuple(i in selected for i in range(len(leaves)))
        self._show_as_buffer = tuple(
            a or b for a, b in zip(self._was_buffer, self.is_buffer, strict=True)
        )
        # The write masks of outer loops' `Buffer`s: kept on every write in this loop.
        self._outer_pred = tuple(_buffer_pred(x) for x in leaves)
        self.init_value = jtu.tree_unflatten(
            self._treedef, [_unwrap(x) for x in leaves]
        )
        self.cond_fun = cond_fun
        self.body_fun = body_fun
        self._body_takes_step = body_takes_step
        self.max_steps = max_steps
        self._init_checks(init_val, check_names)

    @property
    def written_through_buffers(self) -> tuple[bool, ...]:
        """Per leaf of `init_value`: whether the body sees it as a `Buffer` (this
        loop's buffers and outer loops'), i.e. may write it with buffer writes."""
        return (*self._show_as_buffer, *(False for _ in self._checked))

    # -- check_buffers=True ------------------------------------------------------------

    def _init_checks(
        self, init_val: PyTree[Any], check_names: Callable[[Any], str | None] | None
    ) -> None:
        """Choose the checked buffers and add their `written` masks to the carry.

        Checked are: the buffers of this loop when `check_names` is given (and names
        them: `check_names(path)` with the leaf's key path in `init_val`; `None` skips
        it), starting with nothing written; and every `Buffer` of an outer loop that is
        checked there, continuing with its mask, whatever this loop's setting."""
        paths_leaves = jtu.tree_flatten_with_path(init_val, is_leaf=_is_buffer)[0]
        checked: dict[int, str] = {}
        masks = []
        for i, (path, leaf) in enumerate(paths_leaves):
            outer = _outer_checked(leaf)
            if outer is not None:
                checked[i] = outer._name or "<buffer>"
                masks.append(outer._written)
            elif check_names is not None and self.is_buffer[i]:
                name = check_names(path)
                if name is not None:
                    checked[i] = name
                    masks.append(jnp.zeros(jnp.shape(_unwrap(leaf)), jnp.bool_))
        # `_checked`: carry leaf index -> buffer name, in leaf order.
        self._checked = checked
        if checked:
            self.init_value = (self.init_value, tuple(masks))
            self.is_buffer = (*self.is_buffer, *(False for _ in masks))

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
        """The masks after the body: those of the checked `Buffer`s it returned (a leaf
        it returned as a plain array keeps its mask)."""
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
    ) -> PyTree[Any]:
        """The carry with `Buffer`s where `show` says; their writes are masked by
        `mask` (this loop's active batch elements) and by the outer loops' masks."""
        value, written = self._split(value)
        leaves = self._treedef.flatten_up_to(value)
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
        """The carry to return to the user: outer loops' `Buffer`s wrapped back up."""
        return self._as_user_carry(value, self._was_buffer)

    # -- predicate ---------------------------------------------------------------------

    def _call_cond(self, value: PyTree[Array]) -> Bool[Array, ""]:
        pred = self.cond_fun(self._as_user_carry(value, self._show_as_buffer))
        if not (jnp.shape(pred) == () and jnp.result_type(pred) == jnp.bool_):
            raise TypeError(
                "`cond_fun` must return a boolean scalar, but it returned "
                f"{_describe(pred)}. Return e.g. `carry[0] < 10` (a `bool[]` array), "
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

    def body(self, state: LoopState) -> LoopState:
        """One step: `body_fun`, checked, with finished batch elements frozen.

        Buffers are frozen by masking their writes (see `Buffer._pred`), the other
        leaves by a `select` after the body; outside `vmap` both fold away."""
        mask = active_mask(self._keep_going(state.step, state.value))
        carry = self._as_user_carry(state.value, self._show_as_buffer, mask)
        out = (
            self.body_fun(state.step, carry)
            if self._body_takes_step
            else self.body_fun(carry)
        )
        value, written = self._split(state.value)
        unwrapped = jtu.tree_map(_unwrap, out, is_leaf=_is_buffer)
        _check_body_output(value, unwrapped)
        written = self._written_after(out, written)
        out = unwrapped
        values, treedef = jtu.tree_flatten(value)
        new_leaves = [
            jnp.asarray(new, old.dtype)
            if shown
            else lax.select(mask, jnp.asarray(new, old.dtype), old)
            for new, old, shown in zip(
                treedef.flatten_up_to(out), values, self._show_as_buffer, strict=True
            )
        ]
        new_value = self._join(jtu.tree_unflatten(treedef, new_leaves), written)
        return LoopState(state.step + 1, new_value)


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


def _describe(x: Any) -> str:
    try:
        return f"{jnp.result_type(x)}{list(jnp.shape(x))}"
    except TypeError:
        return repr(x)


def _leaf_lines(tree: PyTree[Any]) -> dict[str, str]:
    paths = jtu.tree_flatten_with_path(tree)[0]
    return {jtu.keystr(path) or "<carry>": _describe(leaf) for path, leaf in paths}


def _check_body_output(value: PyTree[Array], out: PyTree[Any]) -> None:
    """Raise a `TypeError` showing both carries line by line if `out` differs from
    `value`."""
    want = _leaf_lines(value)
    got = _leaf_lines(out)
    same_structure = jtu.tree_structure(value) == jtu.tree_structure(out)
    if same_structure and want == got:
        return
    lines = []
    for path in dict.fromkeys([*want, *got]):
        w, g = want.get(path, "(missing)"), got.get(path, "(missing)")
        marker = "   " if w == g else ">> "
        lines.append(f"{marker}{path}: input {w}, output {g}")
    detail = "\n".join(lines)
    if want == got:  # Same leaves, different containers (e.g. a tuple became a list).
        detail += f"\n>> input structure:  {jtu.tree_structure(value)}"
        detail += f"\n>> output structure: {jtu.tree_structure(out)}"
    raise TypeError(
        "`body_fun` must return a carry with the same structure, shapes and dtypes as "
        "the carry it is given (lines marked >> differ):\n"
        f"{detail}\n"
        "Cast the outputs to the input dtypes (e.g. `x.astype(old.dtype)`) and keep "
        "the same pytree structure."
    )
