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
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree

from ._buffer import Buffer, and_pred
from ._unvmap import active_mask, unvmap_any


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
    """

    def __init__(
        self,
        cond_fun: Callable,
        body_fun: Callable,
        init_val: PyTree[Any],
        max_steps: int | None,
        buffers: Callable[[Any], Any] | None,
    ):
        leaves, self._treedef = jtu.tree_flatten(init_val, is_leaf=_is_buffer)
        selected = (
            set()
            if buffers is None
            else _select_buffer_leaves(buffers, self._treedef, len(leaves))
        )
        self._was_buffer = tuple(_is_buffer(x) for x in leaves)
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
        self.max_steps = max_steps

    # -- the carry as the user sees it ------------------------------------------------

    def _as_user_carry(
        self,
        value: PyTree[Array],
        show: Sequence[bool],
        mask: Bool[Array, ""] | None = None,
    ) -> PyTree[Any]:
        """The carry with `Buffer`s where `show` says; their writes are masked by
        `mask` (this loop's active batch elements) and by the outer loops' masks."""
        leaves = self._treedef.flatten_up_to(value)
        return jtu.tree_unflatten(
            self._treedef,
            [
                Buffer(x, and_pred(p, mask)) if s else x
                for x, s, p in zip(leaves, show, self._outer_pred, strict=True)
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
        out = self.body_fun(carry)
        out = jtu.tree_map(_unwrap, out, is_leaf=_is_buffer)
        _check_body_output(state.value, out)
        values, treedef = jtu.tree_flatten(state.value)
        new_leaves = [
            jnp.asarray(new, old.dtype)
            if shown
            else lax.select(
                jnp.broadcast_to(mask, jnp.shape(old)), jnp.asarray(new, old.dtype), old
            )
            for new, old, shown in zip(
                treedef.flatten_up_to(out), values, self._show_as_buffer, strict=True
            )
        ]
        new_value = jtu.tree_unflatten(treedef, new_leaves)
        return LoopState(state.step + 1, new_value)


def _buffer_pred(x: Any) -> Bool[Array, ""] | None:
    pred = None
    while isinstance(x, Buffer):
        pred, x = and_pred(pred, x._pred), x._array
    return None if pred is True else pred


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
