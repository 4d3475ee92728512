"""Argument validation and its messages, for every front end.

One integer checker (`check_int`), one way to describe a value in a message
(`describe`), and one format for a carry that the body changed
(`carry_mismatch_message`). Errors are raised at trace time, name the argument in
backticks, echo the bad value and say the fix: `TypeError` for a wrong type,
`ValueError` for a bad value. (`loopax.schedule` and the budget helpers in
`_schedule/` keep their own checks: that package does not import the rest of loopax.)
"""

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, SupportsIndex

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._custom_types import KINDS
from ._schedule import parse_memory_budget


# Loops count their steps, and checkpoint slots, in int32.
INT32_LIMIT = 2**31 - 1


def describe(x: Any) -> str:
    """`x` for a message: `float32[3]` for an array (`None`, or `repr` for anything
    that is not an array)."""
    if x is None:
        return "None"
    if isinstance(x, bool | int | float | complex | np.generic):
        return f"{jnp.result_type(x)}[]"
    dtype, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
    if dtype is None or shape is None:
        return repr(x)
    return f"{dtype}{list(shape)}"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int,
    optional: bool,
    hint: str,
    maximum: int | None = None,
) -> int | None:
    """Return `value` as an `int` if it is an integer in `[minimum, maximum]` (or
    `None` if `optional`); otherwise raise: `TypeError` for a non-integer (bools
    included) or a traced one, `ValueError` for an integer out of range."""
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
    if maximum is not None and index > maximum:
        raise ValueError(
            f"`{name}` must be at most 2**31 - 1 = {maximum} (loops count their steps "
            f"and checkpoints in int32), got {index}. {hint}"
        )
    return index


def check_callable(name: str, fn: Any, what: str) -> None:
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable ({what}), got {fn!r}.")


def check_bool(name: str, value: Any, hint: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}. {hint}")


def check_kind(kind: Any) -> None:
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(
            f"`kind` must be one of {', '.join(map(repr, KINDS))}, got {kind!r}. "
            "Use kind='lax' for forward mode only, kind='checkpointed' for reverse "
            "mode with a fixed memory budget, kind='bounded' for reverse mode up to "
            "`max_steps`."
        )


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
    check_kind(kind)
    max_steps = check_int(
        "max_steps",
        max_steps,
        minimum=0,
        optional=True,
        maximum=INT32_LIMIT,
        hint="Pass an int bound on the number of body calls, or None for no bound.",
    )
    named = ("all", "auto") if allow_all else ("auto",)
    auto = isinstance(checkpoints, str) and checkpoints == "auto"
    if not (isinstance(checkpoints, str) and checkpoints in named):
        check_int(
            "checkpoints",
            checkpoints,
            minimum=1,
            optional=True,
            maximum=INT32_LIMIT,
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
    check_int(
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
    check_bool(
        "check_buffers",
        check_buffers,
        "Pass check_buffers=True to check the buffer contract at run time (a "
        "debugging aid), or leave it False (the default, no cost).",
    )
    return max_steps


# A checkpoint stack of more bytes than this is refused at trace time (it cannot be
# allocated on any device today); 1 TiB.
CHECKPOINT_BYTES_LIMIT = 2**40


def check_checkpoint_bytes(checkpoints: int, carry_bytes: int) -> None:
    """Refuse a `checkpoints` whose stack could never be allocated."""
    if not isinstance(carry_bytes, int | np.integer):
        return  # A symbolic shape (`jax.export`): its size is unknown until run time.
    if checkpoints * carry_bytes > CHECKPOINT_BYTES_LIMIT:
        raise ValueError(
            f"`checkpoints={checkpoints}` copies of the carry ({carry_bytes} bytes "
            f"each) need {checkpoints * carry_bytes} bytes, more than 1 TiB. Pass a "
            "smaller `checkpoints`, `max_steps=` (no more than `max_steps` "
            "checkpoints are ever stored), or checkpoints='auto' with `memory_budget=`."
        )


# -- how errors name the user's arguments ---------------------------------------------


def _identity(x: Any) -> Any:
    return x


@dataclasses.dataclass(frozen=True)
class Names:
    """How the errors of one loop name the user's functions and carry.

    A front end may wrap the user's carry in a bigger one (`fori_loop` carries
    `(i, upper, init_val)`); `user_part` takes the user's carry out of the loop's, and
    `user_path` maps a key path in the loop's carry to one in the user's (or `None`
    for a leaf the front end added)."""

    cond: str = "cond_fun"
    body: str = "body_fun"
    carry: str = "init_val"
    user_part: Callable[[Any], Any] = _identity
    user_path: Callable[[Any], Any] = _identity

    def leaf_name(self, path: Any) -> str | None:
        """A leaf of the loop's carry as the user knows it, e.g. `init_val['out']`."""
        path = self.user_path(path)
        return None if path is None else self.carry + jtu.keystr(tuple(path))

    def inside(self, index: int) -> "Names":
        """These names for a loop whose carry holds this one's at `carry[index]`."""
        outer_part, outer_path = self.user_part, self.user_path

        def user_path(path):
            if path and path[0] == jtu.SequenceKey(index):
                return outer_path(path[1:])
            return None

        return dataclasses.replace(
            self,
            user_part=lambda c: outer_part(c[index]),
            user_path=user_path,
        )


def _leaf_lines(tree: Any, root: str) -> dict[str, str]:
    paths = jtu.tree_flatten_with_path(tree)[0]
    return {jtu.keystr(path) or root: describe(leaf) for path, leaf in paths}


def carry_mismatch_message(
    names: Names, given: Any, returned: Any, *, weak: Callable[[Any], bool]
) -> str | None:
    """The message for a body that returned `returned` for the carry `given`, or
    `None` if they match: same structure, shapes and dtypes (where a leaf of `given`
    for which `weak` is true may differ in dtype: `lax` promotes it, as weakly typed
    Python scalars are promoted)."""
    want = _leaf_lines(given, "<carry>")
    got = _leaf_lines(returned, "<carry>")
    same_structure = jtu.tree_structure(given) == jtu.tree_structure(returned)
    if same_structure:
        pairs = zip(jtu.tree_leaves(given), jtu.tree_leaves(returned), strict=True)
        if all(_leaf_matches(g, r, weak) for g, r in pairs):
            return None
    lines = []
    for path in dict.fromkeys([*want, *got]):
        w, g = want.get(path, "(missing)"), got.get(path, "(missing)")
        marker = "   " if w == g else ">> "
        lines.append(f"{marker}{path}: input {w}, output {g}")
    detail = "\n".join(lines)
    if want == got:  # Same leaves, different containers (e.g. a tuple became a list).
        detail += f"\n>> input structure:  {jtu.tree_structure(given)}"
        detail += f"\n>> output structure: {jtu.tree_structure(returned)}"
    return (
        f"`{names.body}` must return a carry with the same structure, shapes and "
        f"dtypes as `{names.carry}` (lines marked >> differ):\n"
        f"{detail}\n"
        "Cast the outputs to the input dtypes (e.g. `x.astype(old.dtype)`) and keep "
        "the same pytree structure."
    )


def _leaf_matches(given: Any, returned: Any, weak: Callable[[Any], bool]) -> bool:
    if not (hasattr(returned, "shape") and hasattr(returned, "dtype")):
        try:
            returned = jax.eval_shape(jnp.asarray, returned)
        except TypeError:
            return False
    if jnp.shape(given) != returned.shape:
        return False
    return given.dtype == returned.dtype or weak(given)
