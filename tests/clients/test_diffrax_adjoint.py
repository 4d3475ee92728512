"""`loopax.diffrax.CheckpointedAdjoint`: every transformation through `diffeqsolve`.

Each derivative is compared with the same derivative taken with
`diffrax.DirectAdjoint` (Diffrax's adjoint that supports both modes: the same
discretisation, differentiated through nested scans) or with finite differences.
Problems are tiny (a 2-dimensional ODE with 2 parameters, at most 16 steps), so the
cost is compile time.

The tests run in float64: in float32, the gradients of adaptive solves taken by
different (correct) adjoints differ by rounding, up to about 5e-4 relative here
(`DirectAdjoint` and `RecursiveCheckpointAdjoint` disagree with each other by as much
as with loopax); in float64 they agree to about 1e-10, so the comparisons can be tight.
"""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from client_helpers import assert_close


diffrax = pytest.importorskip("diffrax")
optx = pytest.importorskip("optimistix")
import loopax.diffrax  # noqa: E402


RTOL, ATOL = 1e-7, 1e-9
MAX_STEPS = 16
LOOPAX = loopax.diffrax.CheckpointedAdjoint(checkpoints=3)
DIRECT = diffrax.DirectAdjoint()

# float64 NumPy arrays: JAX makes them float64 arrays inside the `x64` fixture.
THETA = np.array([0.8, 0.5])
Y0 = np.array([1.0, 0.5])
# Initial conditions that take different numbers of adaptive steps (a batched
# predicate under `vmap`).
Y0S = np.array([[1.0, 0.5], [3.0, -2.0], [0.1, 0.0]])


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def vector_field(t, y, theta):
    return -theta[0] * y + theta[1] * jnp.tanh(y[::-1]) * jnp.cos(t)


PID = diffrax.PIDController(rtol=1e-4, atol=1e-6)
CONSTANT = diffrax.ConstantStepSize()
T1 = diffrax.SaveAt(t1=True)
TS = diffrax.SaveAt(ts=np.linspace(0.0, 1.0, 4))
STEPS_DENSE = diffrax.SaveAt(t0=True, steps=True, dense=True)

# name: solver, step size controller, SaveAt
CASES = {
    "tsit5-pid-t1": (diffrax.Tsit5(), PID, T1),
    "dopri5-pid-ts": (diffrax.Dopri5(), PID, TS),
    "heun-constant-steps-dense": (diffrax.Heun(), CONSTANT, STEPS_DENSE),
    "kvaerno5-pid-t1": (diffrax.Kvaerno5(), PID, T1),
    "euler-constant-t1": (diffrax.Euler(), CONSTANT, T1),
}


def make_loss(adjoint, solver, controller, saveat, *, max_steps=MAX_STEPS):
    """A scalar loss of `(theta, y0)` through one `diffeqsolve`."""

    def loss(theta, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            solver,
            t0=0.0,
            t1=1.0,
            dt0=0.1,
            y0=y0,
            args=theta,
            stepsize_controller=controller,
            saveat=saveat,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        ys = sol.ys
        assert ys is not None
        # `SaveAt(steps=True)` pads the unused rows with inf.
        total = jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0) ** 2)
        if saveat.dense:
            total = total + jnp.sum(jax.vmap(sol.evaluate)(jnp.array([0.3, 0.7])))
        return total

    return loss


@ft.cache
def direct(transform, case):
    """`jax.jit(transform(loss))` with `DirectAdjoint`, shared between tests."""
    return jax.jit(transform(make_loss(DIRECT, *CASES[case])))


def both(transform, case):
    """`jax.jit(transform(loss))` for the loopax adjoint and for `DirectAdjoint`."""
    return jax.jit(transform(make_loss(LOOPAX, *CASES[case]))), direct(transform, case)


def grad(loss):
    return jax.grad(loss, argnums=(0, 1))


def jvp(loss):
    def fn(theta, y0):
        return jax.jvp(loss, (theta, y0), (jnp.array([1.0, -0.5]), jnp.ones(2)))

    return fn


def hvp(loss):
    """Forward-over-reverse: the gradient in `theta` and a Hessian-vector product."""

    def fn(theta, y0):
        grad_theta = lambda t: jax.grad(loss)(t, y0)
        return jax.jvp(grad_theta, (theta,), (jnp.array([0.3, 1.0]),))

    return fn


TRANSFORMS = {"grad": grad, "jvp": jvp, "hvp": hvp}


# Excluded by default (run with `-m slow`) to keep this file near a minute: the
# default tests still cover every solver, controller and `SaveAt` option.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=SLOW)
        if c in ("tsit5-pid-t1", "dopri5-pid-ts", "euler-constant-t1")
        else c
        for c in CASES
    ],
)
def test_grad(case):
    got, expected = both(grad, case)
    assert_close(got(THETA, Y0), expected(THETA, Y0), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "case", ["dopri5-pid-ts", pytest.param("kvaerno5-pid-t1", marks=SLOW)]
)
def test_jvp(case):
    got, expected = both(jvp, case)
    assert_close(got(THETA, Y0), expected(THETA, Y0), rtol=RTOL, atol=ATOL)


@pytest.mark.slow  # `test_vmap[hvp]` and the finite-difference Hessian cover it.
@pytest.mark.parametrize("case", ["tsit5-pid-t1", "kvaerno5-pid-t1"])
def test_hvp(case):
    got, expected = both(hvp, case)
    assert_close(got(THETA, Y0), expected(THETA, Y0), rtol=RTOL, atol=ATOL)


def test_hessian_matches_finite_differences():
    """`jax.hessian` in `theta` against central differences of the loopax gradient
    (an independent check of the DirectAdjoint comparisons)."""
    loss = make_loss(LOOPAX, *CASES["euler-constant-t1"])
    hessian = jax.jit(jax.hessian(loss))(THETA, Y0)
    grad_theta = jax.jit(jax.grad(loss))
    eps = 1e-5
    columns = [
        (grad_theta(THETA + eps * e, Y0) - grad_theta(THETA - eps * e, Y0)) / (2 * eps)
        for e in jnp.eye(2)
    ]
    np.testing.assert_allclose(hessian, jnp.stack(columns, axis=1), rtol=1e-5)
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    # `hvp` returns the gradient too (as the primal output of its `jvp`).
    "transform",
    [pytest.param("grad", marks=SLOW), "jvp", "hvp"],
)
def test_vmap(transform):
    """`vmap` of each derivative over initial conditions that take different
    numbers of steps."""
    got, expected = both(
        lambda loss: jax.vmap(TRANSFORMS[transform](loss), in_axes=(None, 0)),
        "tsit5-pid-t1",
    )
    assert_close(got(THETA, Y0S), expected(THETA, Y0S), rtol=RTOL, atol=ATOL)


def bilevel(adjoint):
    """A bilevel toy problem: one gradient step on the fit of `theta` to a target
    trajectory, with the step size `lr` as the hyperparameter; the outer loss is
    the fit after the step. Its gradient in `lr` is a grad of a grad."""
    fit = make_loss(adjoint, diffrax.Euler(), CONSTANT, TS, max_steps=10)
    target = jnp.array([0.5, 1.0])

    def inner(theta):
        return fit(theta, Y0) - jnp.sum(target * theta)

    def outer(lr):
        theta = THETA - lr * jax.grad(inner)(THETA)
        return inner(theta)

    return outer


@pytest.mark.parametrize(
    "adjoint", ["checkpointed", pytest.param("bounded", marks=SLOW)]
)
def test_grad_of_grad(adjoint):
    outer = bilevel(loopax.diffrax.CheckpointedAdjoint(checkpoints=2, kind=adjoint))
    got = jax.jit(jax.grad(outer))(0.1)
    expected = jax.jit(jax.grad(bilevel(DIRECT)))(0.1)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    value = jax.jit(outer)
    eps = 1e-5
    finite_difference = (value(0.1 + eps) - value(0.1 - eps)) / (2 * eps)
    np.testing.assert_allclose(got, finite_difference, rtol=1e-6)


@pytest.mark.slow
def test_checkpoint_counts_agree():
    """The checkpoint count changes the cost, not the derivative; `kind="bounded"`
    gives it too."""
    expected = direct(grad, "dopri5-pid-ts")(THETA, Y0)
    for adjoint in (
        loopax.diffrax.CheckpointedAdjoint(),
        loopax.diffrax.CheckpointedAdjoint(checkpoints=MAX_STEPS),
        loopax.diffrax.CheckpointedAdjoint(kind="bounded"),
    ):
        loss = make_loss(adjoint, *CASES["dopri5-pid-ts"])
        got = jax.jit(grad(loss))(THETA, Y0)
        assert_close(got, expected, rtol=RTOL, atol=ATOL, what=repr(adjoint))


def sde_loss(adjoint, brownian_motion):
    def loss(theta, y0):
        drift = diffrax.ODETerm(vector_field)
        diffusion = diffrax.ControlTerm(
            lambda t, y, theta: theta[1] * jnp.diag(jnp.cos(y)), brownian_motion
        )
        sol = diffrax.diffeqsolve(
            diffrax.MultiTerm(drift, diffusion),
            diffrax.Euler(),
            t0=0.0,
            t1=1.0,
            dt0=0.1,
            y0=y0,
            args=theta,
            saveat=TS,
            adjoint=adjoint,
            max_steps=MAX_STEPS,
        )
        return jnp.sum(sol.ys**2)

    return loss


def test_sde_virtual_brownian_tree():
    bm = diffrax.VirtualBrownianTree(
        0.0, 1.0, tol=1e-3, shape=(2,), key=jax.random.key(0)
    )
    got = jax.jit(grad(sde_loss(LOOPAX, bm)))(THETA, Y0)
    expected = jax.jit(grad(sde_loss(DIRECT, bm)))(THETA, Y0)
    # Looser: here the two adjoints differ by about 4e-7 relative inside the `x64`
    # context (not with x64 switched on globally, where they agree to 1e-10).
    assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_unsafe_brownian_path_rejected():
    bm = diffrax.UnsafeBrownianPath(shape=(2,), key=jax.random.key(0))
    with pytest.raises(ValueError, match="does not support `diffrax.UnsafeBrownian"):
        sde_loss(LOOPAX, bm)(THETA, Y0)


def event_loss(adjoint):
    """Stops when the first component falls to 0.4 (located by a root find)."""
    event = diffrax.Event(
        lambda t, y, args, **kwargs: y[0] - 0.4,
        root_finder=optx.Newton(rtol=1e-8, atol=1e-8),
    )

    def loss(theta, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            t0=0.0,
            t1=3.0,
            dt0=0.25,
            y0=y0,
            args=theta,
            event=event,
            adjoint=adjoint,
            max_steps=MAX_STEPS,
        )
        ts, ys = sol.ts, sol.ys
        assert ts is not None and ys is not None
        return ts[-1] + jnp.sum(ys[-1] ** 2), ts[-1]

    return loss


def test_event():
    """Against finite differences (constant steps: the loss is smooth in `theta`,
    the event time included)."""
    loss = event_loss(LOOPAX)
    got, t_event = jax.jit(jax.grad(loss, has_aux=True))(THETA, Y0)
    assert 0.0 < t_event < 3.0  # The event really fired, before t1.
    value = jax.jit(lambda theta: loss(theta, Y0)[0])
    eps = 1e-6
    expected = [
        (value(THETA + eps * e) - value(THETA - eps * e)) / (2 * eps) for e in np.eye(2)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_no_max_steps():
    """`max_steps=None`: the solve and forward mode run; reverse mode needs
    `checkpoints` (a clear error without), as with `RecursiveCheckpointAdjoint`."""
    case = CASES["euler-constant-t1"]
    loss = make_loss(loopax.diffrax.CheckpointedAdjoint(), *case, max_steps=None)
    reference = make_loss(DIRECT, *case)
    np.testing.assert_allclose(loss(THETA, Y0), reference(THETA, Y0), rtol=1e-12)
    with pytest.raises(ValueError, match="needs to know how many loop states"):
        jax.grad(loss)(THETA, Y0)


@pytest.mark.slow
def test_no_max_steps_with_checkpoints():
    """`max_steps=None` with `checkpoints`: an unbounded checkpointed loop."""
    case = CASES["euler-constant-t1"]
    reference = make_loss(DIRECT, *case)
    with_checkpoints = make_loss(
        loopax.diffrax.CheckpointedAdjoint(checkpoints=3), *case, max_steps=None
    )
    assert_close(
        jax.jit(grad(with_checkpoints))(THETA, Y0),
        jax.jit(grad(reference))(THETA, Y0),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"kind": "revolve"}, ValueError, "`kind` must be one of"),
        ({"checkpoints": 0}, ValueError, "`checkpoints` must be a positive integer"),
        ({"checkpoints": 2.5}, TypeError, "`checkpoints` must be a positive integer"),
    ],
)
def test_bad_options(options, error, match):
    with pytest.raises(error, match=match):
        loopax.diffrax.CheckpointedAdjoint(**options)


def test_reverse_only_stages():
    """`forward_mode=False` keeps Diffrax's default (Equinox's checkpointed) stage
    loop: the same gradient, and no forward mode."""
    adjoint = loopax.diffrax.CheckpointedAdjoint(checkpoints=3, forward_mode=False)
    loss = make_loss(adjoint, *CASES["heun-constant-steps-dense"])
    expected = direct(grad, "heun-constant-steps-dense")
    assert_close(
        jax.jit(grad(loss))(THETA, Y0), expected(THETA, Y0), rtol=RTOL, atol=ATOL
    )
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(ft.partial(loss, y0=Y0), (THETA,), (THETA,))


def test_no_patching():
    """The adjoint leaves Diffrax's and Equinox's loops alone: after a solve with it,
    `RecursiveCheckpointAdjoint` still runs on Equinox's loop (which has no forward
    mode, so `jvp` through it still fails)."""
    loss = make_loss(LOOPAX, *CASES["tsit5-pid-t1"])
    jax.jit(jvp(loss))(THETA, Y0)
    rca = make_loss(
        diffrax.RecursiveCheckpointAdjoint(checkpoints=3), *CASES["tsit5-pid-t1"]
    )
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(ft.partial(rca, y0=Y0), (THETA,), (THETA,))
