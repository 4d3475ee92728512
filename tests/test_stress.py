"""Stress and failure behaviour: long loops, non-finite carries, 64-bit mode, bounds at
the int32 limit, promoted body outputs.

The long runs are marked `slow` (deselected by default; run them with `-m slow`); the
fault checks are cheap and run with the rest of the suite.
"""

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    KINDS,
    REVERSE_KINDS,
    assert_tree_allclose,
    scan_reference_loop,
)

import loopax


# -- 1,000,000 steps in (c + 3) carries -----------------------------------------------

_LONG_STEPS = 1_000_000
_LONG_CHECKPOINTS = 10

# What XLA's temp memory may hold besides (c + 3) carries: the backward controller's
# integer state (O(c) int32 arrays: slot positions, the revolve plan) and the scalars of
# the loop tuples, each padded to XLA's buffer alignment. It does not grow with the
# carry: measured on CPU (jax 0.10.2, c = 10) as 9.8 KiB for a 4-byte carry, 7.5 KiB
# for a 1 KiB carry, and negative (XLA reuses buffers) from a 16 KiB carry on
# (`test_temp_memory_overhead_does_not_grow_with_the_carry`).
_CONSTANT_BYTES = 16 * 1024


def _long_body(c):
    i, x = c
    return i + 1, x + 1e-6 * jnp.sin(x)


def _long_loss(x, num_steps, checkpoints):
    _, x = loopax.while_loop(
        lambda c: c[0] < num_steps,
        _long_body,
        (jnp.array(0), x),
        kind="checkpointed",
        checkpoints=checkpoints,
    )
    return jnp.sum(x)


def _carry_bytes(x) -> int:
    # The user's carry (counter + x) and loopax's own int32 step counter.
    return x.nbytes + jnp.array(0).nbytes + 4


def _temp_bytes(x, num_steps, checkpoints) -> int:
    grad = jax.jit(jax.grad(_long_loss), static_argnums=(1, 2))
    compiled = grad.lower(x, num_steps, checkpoints).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("size", [1, 4096])
def test_temp_memory_overhead_does_not_grow_with_the_carry(size):
    """Compile only: temp memory within (c + 3) carries plus the constant, for carries
    from 4 bytes to 64 KiB."""
    x = jnp.linspace(0.0, 1.0, size)
    temp = _temp_bytes(x, _LONG_STEPS, _LONG_CHECKPOINTS)
    bound = (_LONG_CHECKPOINTS + 3) * _carry_bytes(x) + _CONSTANT_BYTES
    assert temp <= bound, (temp, bound)


@pytest.mark.slow
def test_gradient_through_a_million_steps():
    """In float64: in float32 the rounding of a million products of `1 + 1e-6 cos(x)`
    alone differs by ~1% between two evaluation orders, which would hide errors."""
    with jax.enable_x64(True):
        x = jnp.linspace(0.0, 1.0, 128, dtype=jnp.float64)  # A 1 KiB carry.
        temp = _temp_bytes(x, _LONG_STEPS, _LONG_CHECKPOINTS)
        bound = (_LONG_CHECKPOINTS + 3) * _carry_bytes(x) + _CONSTANT_BYTES
        assert temp <= bound, (temp, bound)
        grad = jax.jit(jax.grad(_long_loss), static_argnums=(1, 2))
        got = grad(x, _LONG_STEPS, _LONG_CHECKPOINTS)
        # The body acts elementwise, so the Jacobian is diagonal and one forward-mode
        # pass with a tangent of ones gives the gradient of the sum: an independent
        # reference.
        _, want = jax.jit(
            lambda x: jax.jvp(
                lambda x: lax.fori_loop(
                    0, _LONG_STEPS, lambda _, x: _long_body((0, x))[1], x
                ),
                (x,),
                (jnp.ones_like(x),),
            )
        )(x)
        assert got.dtype == jnp.float64
        assert bool(jnp.all(jnp.abs(want) > 0.5))  # Not a vanishing gradient.
        assert_tree_allclose(got, want, rtol=1e-8, atol=0)


# -- non-finite carries end at max_steps ----------------------------------------------


def _nonfinite_loop(x, bad, kind, max_steps=6):
    """Never stops by itself: `cond_fun` is `~(err < tol)`, which is True for NaN."""
    return loopax.while_loop(
        lambda c: ~(jnp.abs(c[1]).sum() < 1e-3),
        lambda c: (c[0] + 1, c[1] * bad + 1.0),
        (jnp.array(0), x),
        kind=kind,
        max_steps=max_steps,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_carry_ends_at_max_steps(kind, bad):
    x = jnp.array([1.0, -2.0])
    steps, out = jax.jit(lambda x: _nonfinite_loop(x, bad, kind))(x)
    assert int(steps) == 6
    assert not bool(jnp.any(jnp.isfinite(out)))
    # Under vmap with batched stop steps: the finite element stops at once, the
    # non-finite one at `max_steps`.
    xs = jnp.stack([jnp.zeros(2), x])
    steps, out = jax.jit(jax.vmap(lambda x: _nonfinite_loop(x, bad, kind)))(xs)
    np.testing.assert_array_equal(steps, [0, 6])


@pytest.mark.parametrize("kind", REVERSE_KINDS)
def test_nonfinite_gradient_ends(kind):
    """A gradient through a carry that becomes NaN completes (with NaNs)."""
    grad = jax.jit(
        jax.grad(lambda x: _nonfinite_loop(x, np.nan, kind)[1].sum(), allow_int=True)
    )
    g = grad(jnp.array([1.0, -2.0]))
    assert g.shape == (2,) and not bool(jnp.any(jnp.isfinite(g)))


@pytest.mark.parametrize("kind", ["lax", "checkpointed"])
def test_nonfinite_scan_and_fori_loop_end(kind):
    carry, ys = loopax.scan(
        lambda c, x: (c * x, c),
        jnp.array(1.0),
        jnp.array([jnp.nan, 2.0, 3.0]),
        kind=kind,
    )
    assert bool(jnp.isnan(carry)) and ys.shape == (3,)
    out = loopax.fori_loop(
        0,
        jnp.array(4),
        lambda i, v: v * jnp.inf,
        jnp.array(1.0),
        kind=kind,
        max_steps=4,
    )
    assert bool(jnp.isinf(out))


# -- jax_enable_x64 on and off --------------------------------------------------------


def _x64_loop(x, w, kind):
    def body(c):
        i, x = c
        return i + 1, jnp.tanh(w * x) + 0.1 * x

    return loopax.while_loop(
        lambda c: c[0] < 7,
        body,
        (jnp.array(0), x),
        kind=kind,
        max_steps=10,
        checkpoints=3,
    )[1]


def _x64_reference(x, w):
    def body(c):
        i, x = c
        return i + 1, jnp.tanh(w * x) + 0.1 * x

    return scan_reference_loop(lambda c: c[0] < 7, body, (jnp.array(0), x), 10)[1]


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_x64_on_and_off(kind, x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        x = jnp.linspace(-1.0, 1.0, 3, dtype=dtype)
        w = jnp.array(0.7, dtype)
        assert jnp.array(0).dtype == (jnp.int64 if x64 else jnp.int32)
        out = jax.jit(lambda x, w: _x64_loop(x, w, kind))(x, w)
        assert out.dtype == dtype
        tol = dict(rtol=1e-12, atol=1e-12) if x64 else dict(rtol=1e-5, atol=1e-6)
        assert_tree_allclose(out, _x64_reference(x, w), **tol)
        # Forward mode for every kind, reverse mode where the kind supports it.
        ref_jvp = jax.jvp(lambda x: _x64_reference(x, w), (x,), (jnp.ones_like(x),))
        got_jvp = jax.jvp(lambda x: _x64_loop(x, w, "lax"), (x,), (jnp.ones_like(x),))
        assert_tree_allclose(got_jvp, ref_jvp, **tol)
        if kind in REVERSE_KINDS:
            want = jax.grad(lambda x, w: _x64_reference(x, w).sum(), (0, 1))(x, w)
            got = jax.jit(jax.grad(lambda x, w: _x64_loop(x, w, kind).sum(), (0, 1)))(
                x, w
            )
            assert_tree_allclose(got, want, **tol)


# -- max_steps near the int32 limit ---------------------------------------------------

_INT32_MAX = 2**31 - 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_steps", [_INT32_MAX - 1, _INT32_MAX])
def test_max_steps_at_the_int32_limit_works(kind, max_steps):
    def loop(x, kind):
        return loopax.while_loop(
            lambda c: c[0] < 5,
            lambda c: (c[0] + 1, c[1] * 1.5),
            (jnp.array(0), x),
            kind=kind,
            max_steps=max_steps,
        )

    x = jnp.array([1.0, 2.0])
    steps, out = jax.jit(lambda x: loop(x, kind))(x)
    assert int(steps) == 5
    assert_tree_allclose(out, x * 1.5**5)
    if kind in REVERSE_KINDS:
        g = jax.jit(jax.grad(lambda x: loop(x, kind)[1].sum()))(x)
        assert_tree_allclose(g, jnp.full(2, 1.5**5))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_steps", [_INT32_MAX + 1, 2**40])
def test_max_steps_beyond_the_int32_limit_raises(kind, max_steps):
    with pytest.raises(ValueError, match=r"`max_steps` must be at most 2\*\*31 - 1"):
        loopax.while_loop(
            lambda c: c < 3,
            lambda c: c + 1,
            jnp.array(0),
            kind=kind,
            max_steps=max_steps,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_fori_loop_trip_count_beyond_int32_raises(kind):
    """`upper - lower` does not fit the int32 step counter: a clear error, not a
    wrapped-around trip count."""
    with pytest.raises(ValueError, match=r"`max_steps` must be at most 2\*\*31 - 1"):
        loopax.fori_loop(
            -(2**31), _INT32_MAX, lambda i, v: v, jnp.array(0.0), kind=kind
        )


@pytest.mark.slow
def test_max_steps_at_the_int32_limit_with_a_bounded_loop_that_runs():
    """kind='bounded' at the limit builds 8 nested levels; a loop that stops after a
    few thousand steps runs them and differentiates correctly."""
    n = 3000

    def loop(x):
        return loopax.while_loop(
            lambda c: c[0] < n,
            lambda c: (c[0] + 1, c[1] * 0.999),
            (jnp.array(0), x),
            kind="bounded",
            max_steps=_INT32_MAX,
        )

    steps, out = jax.jit(loop)(jnp.array(1.0))
    assert int(steps) == n
    g = jax.jit(jax.grad(lambda x: loop(x)[1]))(jnp.array(1.0))
    np.testing.assert_allclose(g, 0.999**n, rtol=1e-4)


# -- promoted body outputs are rejected -----------------------------------------------

_BODY_MESSAGE = (
    r"`body_fun` must return a carry with the same structure, shapes and dtypes"
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "init,body,detail",
    [
        pytest.param(
            (jnp.array(0), jnp.ones(2, jnp.float16)),
            lambda c: (c[0] + 1, c[1] * jnp.ones(2, jnp.float32)),
            r">> \[1\]: input float16\[2\], output float32\[2\]",
            id="float16-times-float32",
        ),
        pytest.param(
            (jnp.array(0), jnp.arange(2)),
            lambda c: (c[0] + 1, c[1] + 0.5),
            r">> \[1\]: input int32\[2\], output float32\[2\]",
            id="int-plus-float",
        ),
        pytest.param(
            (jnp.array(0), jnp.array([True, False])),
            lambda c: (c[0] + 1, c[1] + 1),
            r">> \[1\]: input bool\[2\], output int32\[2\]",
            id="bool-plus-int",
        ),
        pytest.param(
            (jnp.array(0), jnp.ones(2)),
            lambda c: (c[0] + 1, c[1] * (1 + 1j)),
            r">> \[1\]: input float32\[2\], output complex64\[2\]",
            id="float-times-complex",
        ),
    ],
)
def test_promoted_body_output_is_rejected(kind, init, body, detail):
    with jax.numpy_dtype_promotion("standard"):
        with pytest.raises(TypeError, match=_BODY_MESSAGE + r"(.|\n)*" + detail):
            loopax.while_loop(lambda c: c[0] < 3, body, init, kind=kind, max_steps=5)


def test_promoted_body_output_is_rejected_under_x64():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        init = (jnp.array(0), jnp.ones(2, jnp.float32))
        with pytest.raises(
            TypeError, match=r">> \[1\]: input float32\[2\], output float64\[2\]"
        ):
            loopax.while_loop(
                lambda c: c[0] < 3,
                lambda c: (c[0] + 1, c[1] * jnp.ones(2, jnp.float64)),
                init,
            )


def test_promoted_scan_output_is_rejected():
    with jax.numpy_dtype_promotion("standard"):
        with pytest.raises(
            TypeError, match=r"`f` must return a carry with the same structure"
        ):
            loopax.scan(
                lambda c, x: (c * x, x), jnp.ones(2, jnp.float16), jnp.ones((3, 2))
            )
