"""Optimistix (and Lineax) on loopax: solutions and gradients equal the unpatched library's.

`optx.RecursiveCheckpointAdjoint` differentiates by unrolling the solver's loop
(`eqxi.while_loop(kind="checkpointed")`); `optx.ImplicitAdjoint` runs it with
`kind="lax"` and differentiates by the implicit function theorem. With loopax
underneath, both must give what they give on Equinox's loop, and (at convergence) agree
with each other.
"""

import jax
import jax.numpy as jnp
import pytest
from client_helpers import assert_close, swap_loops


optx = pytest.importorskip("optimistix")
lx = pytest.importorskip("lineax")

RTOL, ATOL = 2e-5, 1e-6


def residual(y, args):
    a, b = args
    return jnp.tanh(y) + a * y - b


ARGS = (jnp.array([2.0, 1.5, 3.0]), jnp.array([0.5, -1.0, 2.0]))
Y0 = jnp.zeros(3)


def root_loss(adjoint):
    def loss(args):
        solver = optx.Newton(rtol=1e-6, atol=1e-6)
        sol = optx.root_find(residual, solver, Y0, args, adjoint=adjoint, max_steps=32)
        return jnp.sum(sol.value**2), sol.stats["num_steps"]

    return loss


def compare(fn, *args, rtol=RTOL, atol=ATOL):
    expected = jax.jit(fn)(*args)
    with swap_loops() as spy:
        got = jax.jit(fn)(*args)
    assert spy.calls > 0, "loopax was not called: the swap did not take effect"
    assert_close(got, expected, rtol=rtol, atol=atol, what="loopax vs equinox")
    return got, spy


@pytest.mark.parametrize(
    "checkpoints", [None, 2, pytest.param(32, marks=pytest.mark.slow)]
)
def test_newton_unrolled_adjoint(checkpoints):
    adjoint = optx.RecursiveCheckpointAdjoint(checkpoints=checkpoints)
    fn = jax.value_and_grad(root_loss(adjoint), has_aux=True)
    ((_, num_steps), grads), spy = compare(fn, ARGS)
    assert spy.kinds["checkpointed"] > 0, spy.kinds
    assert num_steps >= 3  # The loop really runs (and is reversed) several steps.
    # Unrolling a converged Newton solve matches the implicit-function-theorem gradient.
    implicit_fn = jax.grad(root_loss(optx.ImplicitAdjoint()), has_aux=True)
    implicit, _ = jax.jit(implicit_fn)(ARGS)
    assert_close(grads, implicit, rtol=1e-4, atol=1e-5, what="unrolled vs implicit")


def test_newton_implicit_adjoint():
    fn = jax.value_and_grad(root_loss(optx.ImplicitAdjoint()), has_aux=True)
    _, spy = compare(fn, ARGS)
    assert set(spy.kinds) == {"lax"}, spy.kinds


def test_newton_vmap_of_grad():
    """A batch of root finds that converge after different numbers of steps."""
    adjoint = optx.RecursiveCheckpointAdjoint(checkpoints=2)
    loss = root_loss(adjoint)
    bs = jnp.array([[0.5, -1.0, 2.0], [0.0, 0.1, 0.0], [5.0, -4.0, 6.0]])
    steps = jax.jit(jax.vmap(lambda b: loss((ARGS[0], b))[1]))(bs)
    assert len(set(steps.tolist())) > 1, steps  # The predicate really is batched.
    grad = jax.grad(lambda a, b: loss((a, b)), argnums=(0, 1), has_aux=True)
    compare(jax.vmap(grad, in_axes=(None, 0)), ARGS[0], bs)


def test_lineax_gmres_vmap():
    """Lineax's GMRES: `eqxi.while_loop(kind="lax", buffers=...)` under `vmap`."""
    matrix = jnp.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])
    operator = lx.MatrixLinearOperator(matrix)

    def solve(b):
        solver = lx.GMRES(rtol=1e-6, atol=1e-6, restart=2)
        return lx.linear_solve(operator, b, solver).value

    bs = jnp.array([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    compare(jax.vmap(solve), bs)
