"""`loopax.optimistix.CheckpointedAdjoint`: derivatives through Optimistix solves.

At convergence, differentiating the unrolled iterations gives the derivative of the
solution, which `optimistix.ImplicitAdjoint` computes independently (by the implicit
function theorem). Stopped early, the unrolled derivative is that of the truncated
iteration, checked against finite differences. Runs in float64 (tight comparisons).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from client_helpers import assert_close


optx = pytest.importorskip("optimistix")
import loopax.optimistix  # noqa: E402


LOOPAX = loopax.optimistix.CheckpointedAdjoint(checkpoints=2)
IMPLICIT = optx.ImplicitAdjoint()
A = np.array([2.0, 1.5, 3.0])
# Right-hand sides whose root finds take different numbers of Newton steps.
BS = np.array([[0.5, -1.0, 2.0], [0.0, 0.1, 0.0], [5.0, -4.0, 6.0]])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def root(adjoint, *, max_steps=32, throw=True):
    """The root of `tanh(y) + a * y = b`, as a function of `(a, b)`."""

    def fn(a, b):
        sol = optx.root_find(
            lambda y, args: jnp.tanh(y) + args[0] * y - args[1],
            optx.Newton(rtol=1e-10, atol=1e-10),
            jnp.zeros(3),
            (a, b),
            adjoint=adjoint,
            max_steps=max_steps,
            throw=throw,
        )
        return sol.value

    return fn


def loss(adjoint, **options):
    solve = root(adjoint, **options)
    return lambda a, b: jnp.sum(solve(a, b) ** 2)


def test_root_find_grad_and_jacfwd():
    b = BS[0]
    for transform in (jax.grad, jax.jacfwd):
        got = jax.jit(transform(loss(LOOPAX), argnums=(0, 1)))(A, b)
        expected = jax.jit(transform(loss(IMPLICIT), argnums=(0, 1)))(A, b)
        assert_close(got, expected, rtol=1e-8, atol=1e-10, what=transform.__name__)


@pytest.mark.slow  # Excluded by default to keep the client tests short.
def test_root_find_hessian():
    got = jax.jit(jax.hessian(loss(LOOPAX)))(A, BS[0])
    expected = jax.jit(jax.hessian(loss(IMPLICIT)))(A, BS[0])
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_root_find_vmap_of_grad():
    """A batch of root finds that take different numbers of steps."""
    got = jax.jit(jax.vmap(jax.grad(loss(LOOPAX), argnums=(0, 1)), (None, 0)))(A, BS)
    expected = jax.jit(jax.vmap(jax.grad(loss(IMPLICIT), argnums=(0, 1)), (None, 0)))(
        A, BS
    )
    assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_truncated_solve_against_finite_differences():
    """Two Newton steps, far from converged: the derivative of what was computed,
    which the implicit function theorem does not give."""
    truncated = loss(LOOPAX, max_steps=2, throw=False)
    got = jax.jit(jax.grad(truncated))(A, BS[2])
    value = jax.jit(truncated)
    eps = 1e-6
    expected = [
        (value(A + eps * e, BS[2]) - value(A - eps * e, BS[2])) / (2 * eps)
        for e in np.eye(3)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    implicit = jax.jit(jax.grad(loss(IMPLICIT, max_steps=2, throw=False)))(A, BS[2])
    assert not np.allclose(got, implicit, rtol=1e-3)  # Unrolling really differs here.


@pytest.mark.slow  # Excluded by default to keep the client tests short.
def test_minimise_grad():
    def fit(adjoint):
        def fn(a):
            sol = optx.minimise(
                lambda y, a: jnp.sum((y - a) ** 2 + 0.1 * y**4),
                optx.BFGS(rtol=1e-10, atol=1e-10),
                jnp.zeros(2),
                a,
                adjoint=adjoint,
                max_steps=64,
            )
            return jnp.sum(sol.value**2)

        return fn

    a = np.array([1.0, -2.0])
    got = jax.jit(jax.grad(fit(LOOPAX)))(a)
    expected = jax.jit(jax.grad(fit(IMPLICIT)))(a)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"kind": "revolve"}, ValueError, "`kind` must be one of"),
        ({"checkpoints": 0}, ValueError, "`checkpoints` must be a positive integer"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        loopax.optimistix.CheckpointedAdjoint(**options)
