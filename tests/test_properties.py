"""Property-based tests: random carries, trip counts, bounds, checkpoints, kinds, buffers
and vmap, each checked against independent references: the forward result, forward
mode (`jax.jvp`, every kind) and reverse mode (the kinds that support it).

Compiles are the expensive part, so every loop is a function of *traced* inputs (the
trip count, the initial values, a closed-over weight) and is compiled once per
combination of static options; hypothesis then draws many examples per compiled loop.
"""

import functools as ft

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import scan_reference_loop
from hypothesis import HealthCheck, given, settings, strategies as st

import loopax


REFERENCE_BOUND = 12  # No drawn loop runs longer than this.


def _carry(x, n, batch_shape=()):
    """A carry of mixed dtypes built from one float32 vector `x` (shape (3,))."""
    return {
        "i": jnp.zeros(batch_shape, jnp.int32),
        "n": n,
        "f32": x,
        "f16": x[..., :2].astype(jnp.float16),
        "c64": lax.complex(x[..., 1:], x[..., :2]),
        "flag": jnp.zeros(batch_shape, bool),
        "empty": jnp.zeros((*batch_shape, 0), jnp.float32),
        "buf": jnp.zeros((*batch_shape, REFERENCE_BOUND, 3), jnp.float32),
    }


def _cond(c):
    return c["i"] < c["n"]


def _body(w, c, *, as_buffer):
    i = c["i"]
    f32 = jnp.tanh(w * c["f32"]) + 0.1 * c["f32"]
    write = (
        c["buf"].at[i].set(f32, pred=i % 2 == 0)
        if as_buffer
        else c["buf"].at[i].set(f32)
    )
    return {
        "i": i + 1,
        "n": c["n"],
        "f32": f32,
        "f16": (c["f16"] * jnp.float16(0.5) + jnp.float16(1)).astype(jnp.float16),
        "c64": c["c64"] * jnp.complex64(0.9 + 0.1j),
        "flag": jnp.logical_not(c["flag"]),
        "empty": c["empty"] + 1.0,
        "buf": write,
    }


def _plain_body(w, c):
    """The same step on plain arrays, with the masked write spelled out."""
    i = c["i"]
    f32 = jnp.tanh(w * c["f32"]) + 0.1 * c["f32"]
    row = jnp.where(i % 2 == 0, f32, c["buf"][i])
    return {
        **_body(w, {**c, "buf": c["buf"]}, as_buffer=False),
        "buf": c["buf"].at[i].set(row),
    }


def _loss(final):
    return (
        jnp.sum(final["f32"])
        + jnp.sum(final["buf"])
        + jnp.sum(jnp.real(final["c64"]))
        + jnp.sum(final["f16"].astype(jnp.float32))
    )


@ft.cache
def _compiled(kind, checkpoints, max_steps, buffers, batched):
    """(forward, grad, jvp) of loopax for one combination of static options (grad is
    `None` for the forward-only kind)."""
    options = dict(kind=kind, max_steps=max_steps)
    if kind == "checkpointed":
        options["checkpoints"] = checkpoints
    if buffers:
        options["buffers"] = lambda c: [None, c["buf"]]

    def run(w, x, n):
        body = ft.partial(_body, w, as_buffer=buffers)
        if buffers:
            return loopax.while_loop(_cond, body, _carry(x, n), **options)
        return loopax.while_loop(
            _cond, lambda c: _plain_body(w, c), _carry(x, n), **options
        )

    forward = jax.jit(jax.vmap(run, (None, 0, 0)) if batched else run)
    loss = lambda w, x, n: _loss(run(w, x, n))
    if kind == "lax":
        return forward, None, _jvp_of(loss, batched)
    grad = jax.grad(loss, argnums=(0, 1))
    if batched:
        grad = jax.grad(
            lambda w, x, n: jnp.sum(jax.vmap(loss, (None, 0, 0))(w, x, n)),
            argnums=(0, 1),
        )
    return forward, jax.jit(grad), _jvp_of(loss, batched)


def _jvp_of(loss, batched):
    """Forward mode, which every kind supports: the loss's derivative in the
    direction (1, 1, ...) of `(w, x)`."""

    def jvp(w, x, n):
        return jax.jvp(
            lambda w, x: loss(w, x, n), (w, x), (jnp.ones_like(w), jnp.ones_like(x))
        )

    return jax.jit(jax.vmap(jvp, (None, 0, 0)) if batched else jvp)


@ft.cache
def _reference(max_steps, batched):
    bound = REFERENCE_BOUND if max_steps is None else min(max_steps, REFERENCE_BOUND)

    def run(w, x, n):
        return scan_reference_loop(
            _cond, lambda c: _plain_body(w, c), _carry(x, n), bound
        )

    forward = jax.vmap(run, (None, 0, 0)) if batched else run
    loss = lambda w, x, n: _loss(run(w, x, n))
    if batched:
        grad = jax.grad(
            lambda w, x, n: jnp.sum(jax.vmap(loss, (None, 0, 0))(w, x, n)),
            argnums=(0, 1),
        )
    else:
        grad = jax.grad(loss, argnums=(0, 1))
    return jax.jit(forward), jax.jit(grad), _jvp_of(loss, batched)


def _allclose(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        tol = 2e-2 if x.dtype == np.float16 else 1e-4
        np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


@st.composite
def _cases(draw):
    kind = draw(st.sampled_from(["lax", "checkpointed", "bounded"]))
    # Few distinct static options (each is one compile); 8 >= 7 reaches store-all.
    max_steps = draw(st.sampled_from([None, 1, 7] if kind != "bounded" else [1, 7]))
    checkpoints = (
        draw(st.sampled_from([None, 1, 3, 8])) if kind == "checkpointed" else None
    )
    if kind == "checkpointed" and checkpoints is None and max_steps is None:
        checkpoints = 2  # Reverse mode needs one of them.
    buffers = draw(st.booleans())
    batched = draw(st.booleans())
    batch = 3 if batched else None
    shape = (batch,) if batched else ()
    n = np.asarray(
        draw(
            st.lists(
                st.integers(0, REFERENCE_BOUND),
                min_size=batch or 1,
                max_size=batch or 1,
            )
        ),
        np.int32,
    )
    n = n.reshape(shape)
    x = np.asarray(
        draw(
            st.lists(
                st.floats(-2, 2, width=32),
                min_size=3 * (batch or 1),
                max_size=3 * (batch or 1),
            )
        ),
        np.float32,
    ).reshape((*shape, 3))
    w = np.float32(draw(st.floats(0.25, 1.5, width=32)))
    return kind, checkpoints, max_steps, buffers, batched, w, x, n


def _check(case):
    kind, checkpoints, max_steps, buffers, batched, w, x, n = case
    forward, grad, jvp = _compiled(kind, checkpoints, max_steps, buffers, batched)
    ref_forward, ref_grad, ref_jvp = _reference(max_steps, batched)
    _allclose(forward(w, x, n), ref_forward(w, x, n))
    _allclose(jvp(w, x, n), ref_jvp(w, x, n))
    if grad is not None:
        _allclose(grad(w, x, n), ref_grad(w, x, n))


_SETTINGS = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)


@settings(max_examples=100, **_SETTINGS)
@given(_cases())
def test_random_loops(case):
    _check(case)


@pytest.mark.slow
@settings(max_examples=5000, **_SETTINGS)
@given(_cases())
def test_random_loops_many(case):
    _check(case)


def test_reference_matches_lax_while_loop():
    """The scan reference itself agrees with `lax.while_loop` (so it can judge loopax)."""
    w, x, n = np.float32(0.7), np.linspace(-1, 1, 3, dtype=np.float32), np.int32(7)
    want = lax.while_loop(_cond, lambda c: _plain_body(w, c), _carry(jnp.asarray(x), n))
    _allclose(_reference(None, False)[0](w, x, n), want)
