"""Diffrax on loopax: `diffeqsolve` values and gradients equal the unpatched library's.

Each case runs the same jitted function twice, once on Equinox's loops and once with
`loopax.while_loop` swapped into Diffrax's hooks (`client_helpers.swap_loops`), and
compares. Problems are tiny (a 2-dimensional ODE with a 2x2 weight matrix) so the
whole file costs mostly compile time.
"""

import jax
import jax.numpy as jnp
import pytest
from client_helpers import assert_close, swap_loops


diffrax = pytest.importorskip("diffrax")

RTOL, ATOL = 2e-5, 1e-6
MAX_STEPS = 64


def vector_field(t, y, params):
    return jnp.tanh(params["w"] @ y) + params["b"] * jnp.sin(t)


PARAMS = {
    "w": jnp.array([[-0.5, 1.0], [-1.0, -0.3]]),
    "b": jnp.array([0.2, -0.1]),
}
Y0 = jnp.array([1.0, 0.5])


def solve(params, y0, *, solver, controller, saveat, adjoint, max_steps=MAX_STEPS):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        solver,
        t0=0.0,
        t1=2.0,
        dt0=0.1,
        y0=y0,
        args=params,
        stepsize_controller=controller,
        saveat=saveat,
        adjoint=adjoint,
        max_steps=max_steps,
    )


def make_loss(**options):
    def loss(params, y0):
        sol = solve(params, y0, **options)
        ys = sol.ys
        # `SaveAt(steps=True)` pads the unused rows with inf.
        total = jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0) ** 2)
        if options["saveat"].dense:
            total = total + jnp.sum(jax.vmap(sol.evaluate)(jnp.array([0.3, 1.1, 1.9])))
        return total

    return loss


def compare(fn, *args, buffer_at_set=False, rtol=RTOL, atol=ATOL):
    """`jax.jit(fn)(*args)` on Equinox's loops and on loopax's: equal. Returns the spy."""
    expected = jax.jit(fn)(*args)
    with swap_loops(buffer_at_set=buffer_at_set) as spy:
        got = jax.jit(fn)(*args)
    assert spy.calls > 0, "loopax was not called: the swap did not take effect"
    assert_close(got, expected, rtol=rtol, atol=atol, what="loopax vs equinox")
    return spy


PID = diffrax.PIDController(rtol=1e-4, atol=1e-6)
CONSTANT = diffrax.ConstantStepSize()
TS = diffrax.SaveAt(ts=jnp.linspace(0.0, 2.0, 6))
T1 = diffrax.SaveAt(t1=True)
STEPS = diffrax.SaveAt(t0=True, steps=True)
DENSE = diffrax.SaveAt(t1=True, dense=True)
RCA = diffrax.RecursiveCheckpointAdjoint

CASES = {
    # solver, controller, saveat, adjoint
    "tsit5-pid-t1-rca_none": (diffrax.Tsit5(), PID, T1, RCA()),
    "tsit5-pid-ts-rca3": (diffrax.Tsit5(), PID, TS, RCA(3)),
    "tsit5-pid-steps-rca10": (diffrax.Tsit5(), PID, STEPS, RCA(10)),
    "dopri5-pid-dense-rca3": (diffrax.Dopri5(), PID, DENSE, RCA(3)),
    "heun-const-steps-rca3": (diffrax.Heun(), CONSTANT, STEPS, RCA(3)),
    "euler-const-ts-rca10": (diffrax.Euler(), CONSTANT, TS, RCA(10)),
    # checkpoints >= max_steps: loopax's store-all path.
    "tsit5-pid-t1-rca_all": (diffrax.Tsit5(), PID, T1, RCA(MAX_STEPS)),
    "tsit5-pid-ts-direct": (diffrax.Tsit5(), PID, TS, diffrax.DirectAdjoint()),
    "heun-const-dense-direct": (
        diffrax.Heun(),
        CONSTANT,
        DENSE,
        diffrax.DirectAdjoint(),
    ),
}


# Excluded by default (run with `-m slow`) to keep this file near a minute of CPU time;
# the default cases still cover every solver, controller, `SaveAt` option and adjoint.
SLOW = {"dopri5-pid-dense-rca3", "tsit5-pid-t1-rca_all", "tsit5-pid-ts-direct"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES],
)
def test_value_and_grad(case):
    solver, controller, saveat, adjoint = CASES[case]
    loss = make_loss(
        solver=solver, controller=controller, saveat=saveat, adjoint=adjoint
    )
    spy = compare(jax.value_and_grad(loss, argnums=(0, 1)), PARAMS, Y0)
    expected_kind = (
        "bounded" if isinstance(adjoint, diffrax.DirectAdjoint) else ("checkpointed")
    )
    assert spy.kinds[expected_kind] > 0, spy.kinds


def test_vmap_of_grad():
    """A batch whose elements take different numbers of steps (batched predicate)."""
    loss = make_loss(solver=diffrax.Tsit5(), controller=PID, saveat=TS, adjoint=RCA(3))
    y0s = jnp.array([[1.0, 0.5], [3.0, -2.0], [0.1, 0.0]])
    compare(jax.vmap(jax.grad(loss), in_axes=(None, 0)), PARAMS, y0s)


def test_loopax_buffer_at_set():
    """`equinox.internal.buffer_at_set` swapped for `loopax.buffer_at_set` as well."""
    saveat = diffrax.SaveAt(t0=True, steps=True, dense=True)
    loss = make_loss(
        solver=diffrax.Dopri5(), controller=PID, saveat=saveat, adjoint=RCA(3)
    )
    compare(jax.value_and_grad(loss), PARAMS, Y0, buffer_at_set=True)


@pytest.mark.slow
def test_no_max_steps():
    """`max_steps=None` with explicit checkpoints: an unbounded checkpointed loop."""
    loss = make_loss(
        solver=diffrax.Tsit5(),
        controller=PID,
        saveat=T1,
        adjoint=RCA(4),
        max_steps=None,
    )
    compare(jax.value_and_grad(loss), PARAMS, Y0)


def test_no_max_steps_no_checkpoints_forward():
    """`max_steps=None, checkpoints=None`: Diffrax picks kind="lax" (forward only)."""
    loss = make_loss(
        solver=diffrax.Tsit5(), controller=PID, saveat=TS, adjoint=RCA(), max_steps=None
    )
    spy = compare(loss, PARAMS, Y0)
    assert set(spy.kinds) == {"lax", "checkpointed"}, spy.kinds  # outer lax, RK stages


def test_forward_mode():
    """`ForwardMode`: jacfwd through kind="lax" loops."""
    loss = make_loss(
        solver=diffrax.Tsit5(), controller=PID, saveat=TS, adjoint=diffrax.ForwardMode()
    )
    compare(jax.jacfwd(loss), PARAMS, Y0)


def test_backsolve_adjoint():
    """`BacksolveAdjoint`: kind="lax" loops inside Diffrax's own custom VJP."""
    loss = make_loss(
        solver=diffrax.Tsit5(),
        controller=PID,
        saveat=T1,
        adjoint=diffrax.BacksolveAdjoint(),
    )
    compare(jax.value_and_grad(loss), PARAMS, Y0)
