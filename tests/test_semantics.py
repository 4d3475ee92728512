"""loopax never surprises a `jax.lax` user: the same types, the same `max_steps`
meaning for every kind, `jax.linearize` where `jvp` works, clear errors.

Types are compared with `jax.eval_shape` against the `jax.lax` loop itself (the
reference), so the tests follow the rules of whichever JAX version runs them.
`tests/test_x64.py` runs the type cases again with `jax_enable_x64`.
"""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import (
    FORI_BOUNDS,
    KINDS,
    TYPE_CASES,
    assert_tree_allclose,
    fori_index_type,
    type_mismatches,
)

import loopax


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_output_types_are_lax_types(case):
    assert type_mismatches(case) == []


@pytest.mark.parametrize("bounds", sorted(FORI_BOUNDS))
@pytest.mark.parametrize("kind", KINDS)
def test_fori_index_type_is_lax_type(kind, bounds):
    lower, upper = FORI_BOUNDS[bounds]
    want = fori_index_type(lax.fori_loop, lower, upper)
    assert fori_index_type(loopax.fori_loop, lower, upper, kind=kind) == want
    # Traced bounds: the bounds' common dtype (a weak bound takes the other's).
    seen = []

    def traced(lo, up):
        got = fori_index_type(loopax.fori_loop, lo, up, kind=kind, max_steps=5)
        seen.append((got, fori_index_type(lax.fori_loop, lo, up)))

    jax.eval_shape(traced, lower, upper)
    ((got, want),) = seen
    assert got == want


def test_weak_init_is_promoted_to_the_body_dtype():
    """A Python scalar init with a bfloat16 body: `lax` promotes the init, so does
    loopax (the values as well as the types)."""

    def body(c):
        return (c * 1.5).astype(jnp.bfloat16)

    want = lax.while_loop(lambda c: c < 10, body, 1.0)
    for kind in KINDS:
        got = loopax.while_loop(lambda c: c < 10, body, 1.0, kind=kind, max_steps=9)
        assert got.dtype == jnp.bfloat16
        assert_tree_allclose(got, want)
    grad = jax.grad(
        lambda x: loopax.while_loop(
            lambda c: c < 10,
            lambda c: body(c) * x.astype(jnp.bfloat16),
            1.0,
            max_steps=9,
        ).astype(jnp.float32)
    )(jnp.float32(1.0))
    want_grad = jax.grad(
        lambda x: lax.fori_loop(
            0, 6, lambda i, c: body(c) * x.astype(jnp.bfloat16), jnp.bfloat16(1.0)
        ).astype(jnp.float32)
    )(jnp.float32(1.0))
    assert_tree_allclose(grad, want_grad, rtol=1e-2)


# -- max_steps of fori_loop: at most k body calls, for every kind and bound form ------


_FORI_SUM = jax.jit(
    lambda n: [
        loopax.fori_loop(0, n, lambda i, v: v + i, 0, kind=kind, max_steps=5)
        for kind in KINDS
    ]
)


def test_fori_max_steps_is_one_bound_for_every_kind():
    static = [
        loopax.fori_loop(0, 10, lambda i, v: v + i, 0, kind=kind, max_steps=5)
        for kind in KINDS
    ]
    assert [int(x) for x in static] == [0 + 1 + 2 + 3 + 4] * 3
    assert [int(x) for x in _FORI_SUM(10)] == [10] * 3
    # A bound above the trip count changes nothing.
    assert [int(x) for x in _FORI_SUM(3)] == [0 + 1 + 2] * 3


# -- linearize through kind="lax" ------------------------------------------------------


def _lax_kind_loop(x):
    return loopax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1]) * x), (0, x), kind="lax"
    )[1]


def _lax_loop(x):
    return lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1]) * x), (0, x)
    )[1]


@pytest.mark.parametrize("direct", [True, False])
def test_linearize_through_lax_kind(direct):
    saved = jax.config.jax_use_direct_linearize
    jax.config.update("jax_use_direct_linearize", direct)
    try:
        y, f_jvp = jax.linearize(_lax_kind_loop, jnp.float32(0.7))
        want_y, want_f_jvp = jax.linearize(_lax_loop, jnp.float32(0.7))
        assert_tree_allclose(y, want_y)
        assert_tree_allclose(f_jvp(jnp.float32(1.0)), want_f_jvp(jnp.float32(1.0)))
        # Reverse mode still raises loopax's error, when the transpose is traced.
        with pytest.raises(ValueError, match="kind='checkpointed'"):
            jax.grad(_lax_kind_loop)(jnp.float32(0.7))
        _, f_vjp = jax.vjp(_lax_kind_loop, jnp.float32(0.7))
        with pytest.raises(ValueError, match="kind='checkpointed'"):
            f_vjp(jnp.float32(1.0))
    finally:
        jax.config.update("jax_use_direct_linearize", saved)


# -- typed PRNG keys in the carry ---------------------------------------------------


def test_typed_keys_with_a_memory_budget():
    carry = (jr.key(0), jnp.zeros(4))

    def body(c):
        key, sub = jr.split(c[0])
        return key, c[1] + jr.normal(sub, (4,))

    # One key is two uint32 words: 8 bytes, plus 16 for the floats; counted as such.
    as_data = (jnp.zeros(2, jnp.uint32), jnp.zeros(4))
    for budget in (2096, 10**6):
        want = loopax.checkpoints_for_budget(as_data, budget)
        assert loopax.checkpoints_for_budget(carry, budget) == want
    assert loopax.schedule(num_steps=4, checkpoints=2).peak_memory(carry) == 48
    loss = jax.jit(
        jax.grad(
            lambda x: loopax.while_loop(
                lambda c: jnp.sum(c[1]) < 100.0,
                body,
                (carry[0], carry[1] + x),
                max_steps=4,
                checkpoints="auto",
                memory_budget=2096,
            )[1].sum()
        )
    )
    assert_tree_allclose(loss(jnp.float32(1.0)), jnp.float32(4.0))


def test_peak_memory_is_an_int():
    plan = loopax.schedule(num_steps=5, checkpoints=2)
    assert type(plan.peak_memory(jnp.zeros(3))) is int


# -- errors --------------------------------------------------------------------------


def test_cond_returning_none_says_none():
    with pytest.raises(TypeError, match="but it returned None"):
        loopax.while_loop(lambda c: None, lambda c: c, 0.0)


@pytest.mark.parametrize("name", ["lower", "upper"])
def test_fori_bound_of_wrong_type_is_named(name):
    bounds = {"lower": 0, "upper": 3, name: "0"}
    with pytest.raises(TypeError, match=f"`{name}` must be an integer .*got '0'"):
        loopax.fori_loop(bounds["lower"], bounds["upper"], lambda i, v: v, 0.0)


def test_fori_bounds_of_different_dtypes():
    with pytest.raises(TypeError, match="`lower` and `upper` must have the same"):
        loopax.fori_loop(jnp.int16(0), jnp.int32(3), lambda i, v: v, 0.0)


def test_fori_errors_name_fori_arguments():
    with pytest.raises(TypeError, match="`body_fun` must return .* as `init_val`"):
        loopax.fori_loop(0, 3, lambda i, v: v.astype(jnp.float16), jnp.float32(0))


def test_huge_checkpoints_are_refused_at_trace_time():
    def grad(checkpoints, **kwargs):
        return jax.grad(
            lambda x: loopax.while_loop(
                lambda c: c < 3.0, lambda c: c + x, x, checkpoints=checkpoints, **kwargs
            )
        )(1.0)

    with pytest.raises(ValueError, match=r"`checkpoints` must be at most 2\*\*31 - 1"):
        grad(2**40)
    with pytest.raises(
        ValueError, match=r"`checkpoints=1048577` copies .* more than 1 TiB"
    ):
        jax.eval_shape(
            lambda: loopax.while_loop(
                lambda c: c[0, 0] < 3.0,
                lambda c: c + 1.0,
                jnp.zeros((1024, 1024)),
                checkpoints=2**20 + 1,
            )
        )
    # With `max_steps`, at most `max_steps` are ever stored: accepted.
    assert np.isfinite(grad(2**30, max_steps=4))


def test_buffer_returned_as_plain_array_is_refused():
    def body(c):
        i, buf = c
        buf.at[i].set(1.0)
        return i + 1, jnp.zeros(3)  # A plain array where the Buffer belongs.

    for check_buffers in (False, True):
        with pytest.raises(TypeError, match=r"buffer init_val\[1\] \(selected by "):
            loopax.while_loop(
                lambda c: c[0] < 3,
                body,
                (0, jnp.zeros(3)),
                buffers=lambda c: c[1],
                max_steps=3,
                check_buffers=check_buffers,
            )


def test_symbolic_shapes_under_jax_export():
    """`jax.export` with a symbolic dimension `b`, where `jax.lax` works: the
    checkpoints' size check skips a size known only at run time, `scan(kind="lax")`
    takes its length from `xs`, and `fori_loop` takes `b` as a traced bound."""
    (b,) = jax.export.symbolic_shape("b")
    vector = jax.ShapeDtypeStruct((b,), jnp.float32)
    x = jnp.array([0.5, -1.0, 2.0])

    def loop(x):
        return loopax.while_loop(
            lambda c: c[0] < 4,
            lambda c: (c[0] + 1, jnp.sin(c[1])),
            (0, x),
            checkpoints=2,
        )[1]

    def scan(x):
        return loopax.scan(lambda c, xi: (c * xi, c), 1.0, x, kind="lax")

    def fori(x):
        return loopax.fori_loop(0, x.shape[0], lambda i, c: jnp.sin(c), x, max_steps=8)

    def loss(f):
        return lambda x: jnp.sum(jax.tree.leaves(f(x))[-1])

    for f in (loop, scan, fori):
        for g in (f, jax.grad(loss(f))):
            exported = jax.export.export(jax.jit(g))(vector)
            assert_tree_allclose(exported.call(x), g(x))
    with pytest.raises(ValueError, match="needs a length known at trace time"):
        jax.export.export(jax.jit(lambda x: loopax.scan(lambda c, xi: (c, c), 1.0, x)))(
            vector
        )
    with pytest.raises(ValueError, match="the carry has symbolic shapes"):
        jax.export.export(
            jax.jit(
                lambda x: loopax.while_loop(
                    lambda c: c[0] < 4,
                    lambda c: (c[0] + 1, c[1]),
                    (0, x),
                    checkpoints="auto",
                    memory_budget="1MB",
                )
            )
        )(vector)
