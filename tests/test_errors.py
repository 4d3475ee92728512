"""Bad input raises at trace time, naming the argument, the bad value and the fix."""

import re

import jax
import jax.numpy as jnp
import pytest
from helpers import KINDS, loop_kwargs, toy_body, toy_cond, toy_init, toy_loop

import loopax


# -- options --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["foo", "LAX", None, 3])
def test_unknown_kind(kind):
    match = (
        r"`kind` must be one of 'lax', 'checkpointed', 'bounded', "
        rf"got {re.escape(repr(kind))}\. Use kind="
    )
    with pytest.raises(ValueError, match=match):
        toy_loop(kind=kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "max_steps,error",
    [(True, TypeError), (False, TypeError), (1.0, TypeError), ("3", TypeError)]
    + [(-1, ValueError)],
)
def test_bad_max_steps(kind, max_steps, error):
    match = (
        rf"`max_steps` must be a non-negative integer or None, got "
        rf"{re.escape(repr(max_steps))}\. Pass an int bound"
    )
    with pytest.raises(error, match=match):
        toy_loop(kind=kind, max_steps=max_steps)


def test_traced_max_steps():
    with pytest.raises(TypeError, match="`max_steps` .* must be a static Python int"):
        jax.jit(lambda m: toy_loop(kind="lax", max_steps=m))(3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "checkpoints,error",
    [(0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)],
)
def test_bad_checkpoints(kind, checkpoints, error):
    match = (
        rf"`checkpoints` must be a positive integer or None, got "
        rf"{re.escape(repr(checkpoints))}\. Pass how many loop states"
    )
    with pytest.raises(error, match=match):
        toy_loop(**loop_kwargs(kind, checkpoints=checkpoints))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "base,error",
    [(1, ValueError), (0, ValueError), (-2, ValueError), (2.0, TypeError)]
    + [(True, TypeError), (None, TypeError)],
)
def test_bad_base(kind, base, error):
    match = (
        rf"`base` must be an integer >= 2, got {re.escape(repr(base))}\. "
        r"Pass the length of the innermost scan"
    )
    with pytest.raises(error, match=match):
        toy_loop(**loop_kwargs(kind, base=base))


def test_good_integer_like_options_are_accepted():
    import numpy as np

    out = toy_loop(kind="lax", max_steps=np.int64(2), checkpoints=np.int32(1), base=2)
    assert int(out[0]) == 2


def test_bounded_needs_max_steps():
    with pytest.raises(
        ValueError, match=r"kind='bounded' needs `max_steps`: pass an int bound"
    ):
        toy_loop(kind="bounded")


# -- callables ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_non_callable_cond_fun(kind):
    with pytest.raises(TypeError, match=r"`cond_fun` must be callable .*, got 3"):
        loopax.while_loop(3, toy_body, toy_init(), **loop_kwargs(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_non_callable_body_fun(kind):
    with pytest.raises(TypeError, match=r"`body_fun` must be callable .*, got 'x'"):
        loopax.while_loop(toy_cond, "x", toy_init(), **loop_kwargs(kind))


# -- body output ----------------------------------------------------------------------

_BODY_MESSAGE = (
    r"`body_fun` must return a carry with the same structure, shapes and dtypes"
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "body,detail",
    [
        pytest.param(
            lambda c: (c[0] + 1, jnp.ones(4)),
            r">> \[1\]: input float32\[3\], output float32\[4\]",
            id="shape",
        ),
        pytest.param(
            lambda c: (c[0] + 1, c[1].astype(jnp.float16)),
            r">> \[1\]: input float32\[3\], output float16\[3\]",
            id="dtype",
        ),
        pytest.param(
            lambda c: (c[0] + 1, c[1], c[1]),
            r">> \[2\]: input \(missing\), output float32\[3\]",
            id="extra-leaf",
        ),
        pytest.param(
            lambda c: (c[0] + 1,),
            r">> \[1\]: input float32\[3\], output \(missing\)",
            id="missing-leaf",
        ),
        pytest.param(
            lambda c: [c[0] + 1, c[1]],
            r">> input structure: .*\n>> output structure: ",
            id="tuple-to-list",
        ),
    ],
)
def test_body_output_differs(kind, body, detail):
    with pytest.raises(TypeError, match=_BODY_MESSAGE) as info:
        loopax.while_loop(toy_cond, body, toy_init(), **loop_kwargs(kind))
    assert re.search(detail, str(info.value)), str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_body_output_int_to_float_with_a_strong_counter(kind):
    """A strongly typed counter that the body turns into a float is an error. (A
    weakly typed one, like `jnp.array(0)`, is promoted to float as `lax.while_loop`
    promotes it; see test_semantics.py.)"""
    init = (jnp.array(0, jnp.int32), jnp.ones(3))
    with pytest.raises(TypeError, match=_BODY_MESSAGE) as info:
        loopax.while_loop(
            toy_cond,
            lambda c: (c[0].astype(jnp.float32), c[1]),
            init,
            **loop_kwargs(kind),
        )
    assert re.search(r">> \[0\]: input int32\[\], output float32\[\]", str(info.value))


def test_body_output_message_lists_unchanged_leaves_unmarked():
    with pytest.raises(TypeError, match=_BODY_MESSAGE) as info:
        loopax.while_loop(toy_cond, lambda c: (c[0] + 1, jnp.ones(4)), toy_init())
    lines = str(info.value).splitlines()
    assert "   [0]: input int32[], output int32[]" in lines
    assert ">> [1]: input float32[3], output float32[4]" in lines


def test_body_output_differs_under_jit_and_vmap():
    def run(x):
        return loopax.while_loop(
            lambda c: c[0] < 3, lambda c: (c[0] + 1, c[1][:1]), (jnp.array(0), x)
        )

    with pytest.raises(TypeError, match=_BODY_MESSAGE):
        jax.jit(jax.vmap(run))(jnp.ones((2, 3)))


# -- cond_fun output ------------------------------------------------------------------

_COND_MESSAGE = r"`cond_fun` must return a boolean scalar, but it returned "


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "cond,got",
    [
        pytest.param(lambda c: c[0], r"int32\[\]", id="int"),
        pytest.param(lambda c: c[1][0], r"float32\[\]", id="float"),
        pytest.param(lambda c: c[1] > 0, r"bool\[3\]", id="vector-of-bools"),
        pytest.param(lambda c: 1, r"int32\[\]", id="python-int"),
    ],
)
def test_cond_fun_not_boolean_scalar(kind, cond, got):
    with pytest.raises(TypeError, match=_COND_MESSAGE + got):
        loopax.while_loop(cond, toy_body, toy_init(), **loop_kwargs(kind))


def test_cond_fun_not_boolean_scalar_under_vmap():
    def run(x):
        return loopax.while_loop(lambda c: c[1] > 0, toy_body, (jnp.array(0), x))

    with pytest.raises(TypeError, match=_COND_MESSAGE + r"bool\[3\]"):
        jax.vmap(run)(jnp.ones((2, 3)))


# -- buffers --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("buffers", [3, "c[1]", [lambda c: c[1]]])
def test_buffers_not_callable(kind, buffers):
    match = (
        r"`buffers` must be None or a function from the carry to some of its arrays, "
        rf"got {re.escape(repr(buffers))}\. Pass e\.g\. `buffers=lambda carry"
    )
    with pytest.raises(TypeError, match=match):
        toy_loop(**loop_kwargs(kind, buffers=buffers))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "buffers",
    [
        pytest.param(lambda c: jnp.zeros(3), id="new-array"),
        pytest.param(lambda c: (c[1], jnp.zeros(3)), id="one-new-array"),
        pytest.param(lambda c: 1.0, id="number"),
        pytest.param(lambda c: "x", id="string"),
    ],
)
def test_buffers_not_in_carry(kind, buffers):
    with pytest.raises(
        ValueError,
        match=r"`buffers` must return arrays of the carry .* which is not part of the "
        r"carry\. Return the carry's own arrays",
    ):
        toy_loop(**loop_kwargs(kind, buffers=buffers))


@pytest.mark.parametrize("kind", KINDS)
def test_buffers_fails_on_carry(kind):
    with pytest.raises(
        TypeError, match=r"`buffers` must be a function .* calling it failed with"
    ):
        toy_loop(**loop_kwargs(kind, buffers=lambda c: c["missing"]))


def test_max_steps_beyond_int32_is_rejected():
    with pytest.raises(ValueError, match=r"`max_steps` must be at most 2\*\*31 - 1"):
        loopax.while_loop(
            lambda c: c < 3, lambda c: c + 1, jnp.array(0), max_steps=2**31
        )
    # The largest int32 bound itself works.
    out = loopax.while_loop(
        lambda c: c < 3, lambda c: c + 1, jnp.array(0), kind="lax", max_steps=2**31 - 1
    )
    assert int(out) == 3


@pytest.mark.parametrize("kind", ["lax", "checkpointed", "bounded"])
def test_nan_carry_ends_at_max_steps(kind):
    """A NaN carry whose predicate stays True still stops at `max_steps`, without hanging."""
    out = loopax.while_loop(
        lambda c: c[0] < 100,
        lambda c: (c[0] + 1, c[1] + jnp.nan),
        (0, jnp.array(0.0)),
        kind=kind,
        max_steps=5,
    )
    assert int(out[0]) == 5 and bool(jnp.isnan(out[1]))
