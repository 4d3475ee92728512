"""With `jax_enable_x64` (and the strict promotion of `conftest.py`), loopax's types are
still `jax.lax`'s, and Diffrax runs on loopax as it runs on Equinox's loop.

`jax_enable_x64` must be set before JAX creates any array, so this module runs in its
own pytest invocation and is skipped otherwise:

    JAX_ENABLE_X64=1 pytest tests/test_x64.py
"""

import os
import pathlib
import sys

import jax
import jax.lax as lax
import jax.numpy as jnp
import pytest
from helpers import (
    FORI_BOUNDS,
    KINDS,
    TYPE_CASES,
    assert_tree_allclose,
    fori_index_type,
    type_mismatches,
    type_signature,
)

import loopax


pytestmark = pytest.mark.skipif(
    os.environ.get("JAX_ENABLE_X64", "").lower() not in ("1", "true"),
    reason="needs JAX_ENABLE_X64=1 (a separate pytest run)",
)


def test_x64_is_on():
    assert jnp.asarray(1.0).dtype == jnp.float64


@pytest.mark.parametrize("case", sorted(TYPE_CASES))
def test_output_types_are_lax_types(case):
    assert type_mismatches(case) == []


@pytest.mark.parametrize("bounds", sorted(FORI_BOUNDS))
@pytest.mark.parametrize("kind", KINDS)
def test_fori_index_type_is_lax_type(kind, bounds):
    lower, upper = FORI_BOUNDS[bounds]
    want = fori_index_type(lax.fori_loop, lower, upper)
    assert fori_index_type(loopax.fori_loop, lower, upper, kind=kind) == want


@pytest.mark.parametrize("kind", KINDS)
def test_fori_index_is_int64(kind):
    """`fori_loop(0, 3, lambda i, v: v + i, 0)`: an int64 index, as `lax.fori_loop`."""
    got = loopax.fori_loop(0, 3, lambda i, v: v + i, 0, kind=kind)
    want = lax.fori_loop(0, 3, lambda i, v: v + i, 0)
    assert type_signature(lambda: got) == type_signature(lambda: want)
    assert got.dtype == jnp.int64 and int(got) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_weak_float64_init_promoted_to_float32(kind):
    def body(c):
        return c * jnp.float32(0.5)

    want = lax.while_loop(lambda c: c > 0.1, body, 1.0)
    got = loopax.while_loop(lambda c: c > 0.1, body, 1.0, kind=kind, max_steps=9)
    assert got.dtype == jnp.float32
    assert_tree_allclose(got, want)


# -- Diffrax on loopax, in x64 with strict promotion --------------------------------

sys.path.insert(0, str(pathlib.Path(__file__).parent / "clients"))
from client_helpers import assert_close, swap_loops  # noqa: E402


diffrax = pytest.importorskip("diffrax")


def _solve(y0, t0=0.0, t1=1.0, saveat=None, **kwargs):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: -y + jnp.sin(t)),
        diffrax.Tsit5(),
        t0=t0,
        t1=t1,
        dt0=0.1 if t1 > t0 else -0.1,
        y0=y0,
        saveat=saveat or diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8),
        max_steps=64,
        **kwargs,
    )


_Y0 = jnp.array([1.0, 0.5])

_DIFFRAX_CASES = {
    "dense": lambda y0: _solve(y0, saveat=diffrax.SaveAt(t1=True, dense=True)).evaluate(
        0.5
    ),
    "dense-solution": lambda y0: _solve(y0, saveat=diffrax.SaveAt(dense=True)),
    "subsaveat": lambda y0: (
        _solve(
            y0,
            saveat=diffrax.SaveAt(
                subs=(
                    diffrax.SubSaveAt(ts=jnp.linspace(0.0, 1.0, 4)),
                    diffrax.SubSaveAt(t1=True, fn=lambda t, y, args: jnp.sum(y)),
                )
            ),
        ).ys
    ),
    "vmap-y0": lambda y0: jax.vmap(lambda y: _solve(y).ys)(jnp.stack([y0, 2 * y0])),
    "reverse-time": lambda y0: (
        _solve(
            y0, t0=1.0, t1=0.0, saveat=diffrax.SaveAt(ts=jnp.array([1.0, 0.5, 0.0]))
        ).ys
    ),
}


@pytest.mark.parametrize("case", sorted(_DIFFRAX_CASES))
def test_diffrax_on_loopax(case):
    """Values, dtypes and weak types of the solution equal the unpatched library's."""
    fn = jax.jit(_DIFFRAX_CASES[case])
    want_types = type_signature(fn, _Y0)
    want = fn(_Y0)
    with swap_loops() as spy:
        got_types = type_signature(fn, _Y0)
        got = fn(_Y0)
    assert spy.calls > 0, "loopax was not called: the swap did not take effect"
    assert got_types == want_types
    assert_close(got, want, rtol=1e-10, atol=1e-12, what=case)


def test_diffrax_gradient_on_loopax():
    def loss(y0):
        return jnp.sum(_solve(y0, saveat=diffrax.SaveAt(ts=jnp.linspace(0, 1, 3))).ys)

    want = jax.jit(jax.grad(loss))(_Y0)
    with swap_loops() as spy:
        got = jax.jit(jax.grad(loss))(_Y0)
    assert spy.calls > 0
    assert_close(got, want, rtol=1e-10, atol=1e-12, what="grad")


@pytest.mark.parametrize("checkpoints", [8, 100])
def test_online_rule_past_the_table_in_x64(monkeypatch, checkpoints):
    """The compiled online rule (its int32 plan, in chunks past 64 slots) runs in x64
    past a shrunken decision table, and the gradient matches forward mode."""
    monkeypatch.setattr(loopax._schedule.online, "ONLINE_TABLE_STEPS", 8)
    jax.clear_caches()  # No lowering with the shrunk table outlives the test.

    def body(s):
        return s[0] + 1, jnp.sin(s[1]) * 1.01

    def loop(x):
        return loopax.while_loop(
            lambda s: s[0] < 400, body, (0, x), checkpoints=checkpoints
        )[1]

    want = jax.jacfwd(lambda x: lax.fori_loop(0, 400, lambda i, y: body((i, y))[1], x))
    assert_tree_allclose(jax.jit(jax.grad(loop))(0.3), want(0.3), rtol=1e-10)
    jax.clear_caches()
