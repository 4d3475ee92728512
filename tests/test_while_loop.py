"""`loopax.while_loop` returns what `lax.while_loop` returns, for every kind."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.test_util as jtest
import numpy as np
import pytest
from helpers import (
    KINDS,
    assert_tree_allclose,
    bounded_lax_loop,
    loop_kwargs,
    mixed_body,
    mixed_carry,
    mixed_cond,
    python_loop,
)

import loopax


def _counter_cond(c):
    return c[0] < 7


def _counter_body(c):
    i, x = c
    return i + 1, x * 1.5 + jnp.sin(x)


def _counter_init():
    return jnp.array(0, jnp.int32), jnp.linspace(-1.0, 1.0, 3)


# -- forward values ------------------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("num_steps", [0, 1, 7])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_dtypes_match_lax(kind, num_steps, jit):
    def run(init):
        return loopax.while_loop(mixed_cond, mixed_body, init, **loop_kwargs(kind))

    init = mixed_carry(num_steps)
    expected = lax.while_loop(mixed_cond, mixed_body, init)
    if jit:
        out = jax.jit(run)(init)
    else:
        with jax.disable_jit():
            out = run(init)
    assert_tree_allclose(out, expected, rtol=1e-3)
    assert int(out["i"]) == num_steps
    assert_tree_allclose(python_loop(mixed_cond, mixed_body, init), expected, rtol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_unjitted_matches_lax(kind):
    init = _counter_init()
    out = loopax.while_loop(_counter_cond, _counter_body, init, **loop_kwargs(kind))
    assert_tree_allclose(out, lax.while_loop(_counter_cond, _counter_body, init))


@pytest.mark.parametrize("kind", KINDS)
def test_scalar_and_python_number_carry(kind):
    out = loopax.while_loop(lambda c: c < 10, lambda c: c + 1, 0, **loop_kwargs(kind))
    assert_tree_allclose(out, lax.while_loop(lambda c: c < 10, lambda c: c + 1, 0))
    out = loopax.while_loop(
        lambda c: c < 10, lambda c: c + 1, jnp.array(0), **loop_kwargs(kind)
    )
    assert int(out) == 10


@pytest.mark.parametrize("kind", KINDS)
def test_empty_carry_structures(kind):
    # A carry whose only leaves are the counter, inside empty containers.
    init = (jnp.array(0), (), {}, [])
    out = loopax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, *c[1:]), init, **loop_kwargs(kind)
    )
    assert_tree_allclose(out, (jnp.array(3), (), {}, []))


@pytest.mark.parametrize("max_steps", [0, 1, 3, 7, 20])
@pytest.mark.parametrize("kind", KINDS)
def test_max_steps_bounds_the_loop(kind, max_steps):
    init = _counter_init()
    out = jax.jit(
        lambda init: loopax.while_loop(
            _counter_cond, _counter_body, init, kind=kind, max_steps=max_steps
        )
    )(init)
    assert int(out[0]) == min(7, max_steps)
    assert_tree_allclose(
        out, bounded_lax_loop(_counter_cond, _counter_body, init, max_steps)
    )
    assert_tree_allclose(
        out, python_loop(_counter_cond, _counter_body, init, max_steps), rtol=1e-4
    )


@pytest.mark.parametrize("kind", KINDS)
def test_max_steps_under_disable_jit(kind):
    with jax.disable_jit():
        out = loopax.while_loop(
            _counter_cond, _counter_body, _counter_init(), kind=kind, max_steps=2
        )
    assert int(out[0]) == 2


@pytest.mark.parametrize("kind", KINDS)
def test_unused_options_are_accepted(kind):
    # Client libraries pass the same keyword set to every kind.
    out = loopax.while_loop(
        _counter_cond,
        _counter_body,
        _counter_init(),
        kind=kind,
        max_steps=50,
        checkpoints=3,
        base=4,
    )
    assert_tree_allclose(
        out, lax.while_loop(_counter_cond, _counter_body, _counter_init())
    )


@pytest.mark.parametrize("kind", KINDS)
def test_closed_over_arrays(kind):
    scale = jnp.array([0.5, 2.0, 1.0])
    limit = jnp.array(4)

    def cond(c):
        return c[0] < limit

    def body(c):
        return c[0] + 1, c[1] * scale + 1.0

    @jax.jit
    def run(init, scale_, limit_):
        def cond_(c):
            return c[0] < limit_

        def body_(c):
            return c[0] + 1, c[1] * scale_ + 1.0

        return loopax.while_loop(cond_, body_, init, **loop_kwargs(kind))

    init = (jnp.array(0), jnp.ones(3))
    expected = lax.while_loop(cond, body, init)
    assert_tree_allclose(
        loopax.while_loop(cond, body, init, **loop_kwargs(kind)), expected
    )
    assert_tree_allclose(run(init, scale, limit), expected)


def test_docstring_example_prints_ten():
    out = loopax.while_loop(lambda c: c < 10, lambda c: c + 1, jnp.array(0), kind="lax")
    assert int(out) == 10


# -- vmap ----------------------------------------------------------------------------


def _stop_cond(c):
    i, stop, _ = c
    return i < stop


def _stop_body(c):
    i, stop, x = c
    return i + 1, stop, x * 1.25 + i.astype(x.dtype)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_vmap_batched_predicate(kind, jit):
    stops = jnp.array([0, 1, 5, 3], jnp.int32)
    xs = jnp.arange(8.0).reshape(4, 2)

    def run(stop, x):
        init = (jnp.array(0, jnp.int32), stop, x)
        return loopax.while_loop(_stop_cond, _stop_body, init, **loop_kwargs(kind))

    batched = jax.vmap(run)
    out = jax.jit(batched)(stops, xs) if jit else batched(stops, xs)
    # Finished elements are frozen: each equals its own, unbatched loop.
    np.testing.assert_array_equal(out[0], stops)
    for b in range(4):
        init = (jnp.array(0, jnp.int32), stops[b], xs[b])
        expected = lax.while_loop(_stop_cond, _stop_body, init)
        assert_tree_allclose(jax.tree.map(lambda leaf, b=b: leaf[b], out), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_batched_predicate_with_max_steps(kind):
    stops = jnp.array([0, 2, 6, 4], jnp.int32)
    xs = jnp.arange(4.0)

    def run(stop, x):
        init = (jnp.array(0, jnp.int32), stop, x)
        return loopax.while_loop(_stop_cond, _stop_body, init, kind=kind, max_steps=3)

    out = jax.jit(jax.vmap(run))(stops, xs)
    np.testing.assert_array_equal(out[0], jnp.minimum(stops, 3))
    for b in range(4):
        init = (jnp.array(0, jnp.int32), stops[b], xs[b])
        expected = bounded_lax_loop(_stop_cond, _stop_body, init, 3)
        assert_tree_allclose(jax.tree.map(lambda leaf, b=b: leaf[b], out), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_unbatched_predicate(kind):
    xs = jnp.arange(6.0).reshape(3, 2)

    def run(x):
        init = (jnp.array(0, jnp.int32), x)  # the counter is not batched
        return loopax.while_loop(
            _counter_cond, _counter_body, init, **loop_kwargs(kind)
        )

    out = jax.jit(jax.vmap(run))(xs)
    expected = jax.vmap(
        lambda x: lax.while_loop(
            _counter_cond, _counter_body, (jnp.array(0, jnp.int32), x)
        )
    )(xs)
    assert_tree_allclose(out, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_vmap_of_closed_over_batched_limit(kind):
    # The predicate is batched through a closed-over value only.
    def run(limit):
        return loopax.while_loop(
            lambda c: c[0] < limit,
            lambda c: (c[0] + 1, c[1] * 2.0),
            (jnp.array(0), jnp.array(1.0)),
            **loop_kwargs(kind),
        )

    out = jax.vmap(run)(jnp.array([3, 0, 5]))
    np.testing.assert_array_equal(out[0], [3, 0, 5])
    np.testing.assert_allclose(out[1], [8.0, 1.0, 32.0])


# -- forward-mode differentiation of kind="lax" --------------------------------------


def _affine_loop(kind, num_steps):
    """y -> 2 y + a, `num_steps` times: y_n = 2^n y_0 + (2^n - 1) a."""

    def run(y0, a):
        return loopax.while_loop(
            lambda c: c[0] < num_steps,
            lambda c: (c[0] + 1, 2.0 * c[1] + a),
            (jnp.array(0), y0),
            kind=kind,
        )[1]

    return run


@pytest.mark.parametrize("num_steps", [0, 1, 5])
def test_jvp_lax_kind_analytical(num_steps):
    run = _affine_loop("lax", num_steps)
    y0, a = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.25])
    primal, tangent = jax.jvp(run, (y0, a), (jnp.ones(2), jnp.zeros(2)))
    np.testing.assert_allclose(primal, 2.0**num_steps * y0 + (2.0**num_steps - 1) * a)
    np.testing.assert_allclose(tangent, 2.0**num_steps * jnp.ones(2))
    # The closed-over `a` gets its derivative too.
    _, tangent = jax.jvp(run, (y0, a), (jnp.zeros(2), jnp.ones(2)))
    np.testing.assert_allclose(tangent, (2.0**num_steps - 1) * jnp.ones(2))


def test_jacfwd_lax_kind_analytical():
    run = _affine_loop("lax", 4)
    y0, a = jnp.array([1.0, -2.0, 3.0]), jnp.array(0.5)
    jac_y0, jac_a = jax.jit(jax.jacfwd(run, argnums=(0, 1)))(y0, a)
    np.testing.assert_allclose(jac_y0, 16.0 * jnp.eye(3))
    np.testing.assert_allclose(jac_a, 15.0 * jnp.ones(3))


def _nonlinear(kind):
    def run(x):
        init = (jnp.array(0), x)
        return loopax.while_loop(_counter_cond, _counter_body, init, kind=kind)[1]

    return run


def test_jvp_lax_kind_matches_lax_and_finite_differences():
    x = jnp.array([0.3, -0.2, 0.1])
    t = jnp.array([1.0, 0.5, -1.0])

    def reference(x):
        return lax.while_loop(_counter_cond, _counter_body, (jnp.array(0), x))[1]

    out = jax.jvp(_nonlinear("lax"), (x,), (t,))
    assert_tree_allclose(out, jax.jvp(reference, (x,), (t,)), rtol=1e-4)
    assert_tree_allclose(
        jax.jacfwd(_nonlinear("lax"))(x), jax.jacfwd(reference)(x), rtol=1e-4
    )
    x64 = np.asarray(x, np.float64)
    with jax.enable_x64(True):
        jtest.check_grads(
            _nonlinear("lax"), (jnp.asarray(x64),), order=1, modes=["fwd"]
        )


def test_jvp_lax_kind_under_vmap_with_batched_predicate():
    def run(stop, x):
        init = (jnp.array(0, jnp.int32), stop, x)
        return loopax.while_loop(_stop_cond, _stop_body, init, kind="lax")[2]

    stops, xs = jnp.array([0, 2, 4]), jnp.array([1.0, 2.0, 3.0])
    _, tangents = jax.vmap(lambda s, x: jax.jvp(lambda x: run(s, x), (x,), (1.0,)))(
        stops, xs
    )
    np.testing.assert_allclose(tangents, 1.25 ** np.array([0, 2, 4]))


# -- reverse mode of kind="lax" raises ------------------------------------------------

_REVERSE_MATCH = r"kind='checkpointed'.*kind='bounded'"


def _loss(x):
    return _nonlinear("lax")(x).sum()


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda x: jax.grad(_loss)(x), id="grad"),
        pytest.param(lambda x: jax.jit(jax.grad(_loss))(x), id="jit(grad)"),
        pytest.param(lambda x: jax.grad(jax.jit(_loss))(x), id="grad(jit)"),
        pytest.param(lambda x: jax.vjp(_nonlinear("lax"), x)[1](x), id="vjp"),
        pytest.param(lambda x: jax.jacrev(_nonlinear("lax"))(x), id="jacrev"),
        pytest.param(lambda x: jax.vmap(jax.grad(_loss))(x[None]), id="vmap(grad)"),
    ],
)
def test_reverse_mode_of_lax_kind_raises(transform):
    with pytest.raises(ValueError, match=_REVERSE_MATCH):
        transform(jnp.array([0.3, -0.2, 0.1]))


def test_reverse_mode_through_closed_over_array_raises():
    def loss(a):
        return loopax.while_loop(
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1, c[1] * a),
            (jnp.array(0), jnp.array(1.0)),
            kind="lax",
        )[1]

    with pytest.raises(ValueError, match=_REVERSE_MATCH):
        jax.grad(loss)(jnp.array(2.0))


def test_grad_of_integer_only_lax_loop_does_not_raise():
    # Nothing differentiable flows through the loop: reverse mode is fine.
    def loss(x):
        n = loopax.while_loop(
            lambda i: i < 3, lambda i: i + 1, jnp.array(0), kind="lax"
        )
        return x * n.astype(x.dtype)

    assert float(jax.grad(loss)(jnp.array(2.0))) == 3.0
