"""Train a neural ODE whose solver chooses its own step sizes.

The vector field is a small MLP. The solver is Heun's method with an embedded Euler
error estimate: it shrinks the step where the estimate is too large, grows it where it is
small, and stops when `t` reaches `T1`. How many steps that takes depends on the
parameters, so the loop's length is only known at run time: a `lax.while_loop`, made
reverse-mode differentiable by `loopax.while_loop(..., kind="checkpointed")`, which
stores `CHECKPOINTS` states and recomputes the others during the backward pass.

The model learns to rotate its initial condition by `T1` radians (the flow of a harmonic
oscillator) from a batch of examples, by a few steps of gradient descent.

Run: `python docs/examples/neural_ode.py`.
"""

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr

import loopax


STATE, WIDTH = 2, 32
T1 = 1.5
RTOL, ATOL = 1e-3, 1e-6
CHECKPOINTS = 8
LEARNING_RATE = 0.02
TRAINING_STEPS = 10


def init_params(key):
    k1, k2 = jr.split(key)
    w1 = jr.normal(k1, (WIDTH, STATE)) / STATE**0.5
    w2 = 0.1 * jr.normal(k2, (STATE, WIDTH)) / WIDTH**0.5
    return w1, jnp.zeros(WIDTH), w2


def vector_field(params, y):
    w1, b1, w2 = params
    return w2 @ jnp.tanh(w1 @ y + b1)


def solve(params, y0):
    """Integrate `dy/dt = vector_field(params, y)` from `t = 0` to `T1`.

    Returns `y(T1)` and the number of steps taken (accepted and rejected).
    """

    def cond_fun(carry):
        t, _, _, _ = carry
        return t < T1

    def body_fun(carry):
        t, y, dt, num_steps = carry
        dt = jnp.minimum(dt, T1 - t)
        f0 = vector_field(params, y)
        y_euler = y + dt * f0
        y_heun = y + 0.5 * dt * (f0 + vector_field(params, y_euler))
        # The step-size controller decides only *where* the solver steps. We treat it as
        # a constant, so the gradient is the exact gradient of the discrete solution the
        # solver computed with these steps.
        scale = ATOL + RTOL * jnp.maximum(jnp.abs(y), jnp.abs(y_heun))
        error = lax.stop_gradient(jnp.sqrt(jnp.mean(((y_heun - y_euler) / scale) ** 2)))
        accept = error <= 1.0
        factor = jnp.clip(0.9 / jnp.sqrt(jnp.maximum(error, 1e-10)), 0.2, 5.0)
        t = jnp.where(accept, t + dt, t)
        y = jnp.where(accept, y_heun, y)
        return t, y, dt * factor, num_steps + 1

    init_val = (jnp.array(0.0), y0, jnp.array(0.01), jnp.array(0))
    _, y1, _, num_steps = loopax.while_loop(
        cond_fun, body_fun, init_val, kind="checkpointed", checkpoints=CHECKPOINTS
    )
    return y1, num_steps


def loss_fn(params, y0s, targets):
    # Under `vmap` the batch runs in lock-step until its last element reaches `T1`.
    y1s, num_steps = jax.vmap(solve, in_axes=(None, 0))(params, y0s)
    return jnp.mean(jnp.sum((y1s - targets) ** 2, axis=-1)), num_steps


@jax.jit
def train_step(params, y0s, targets):
    (loss, num_steps), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, y0s, targets
    )
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, loss, num_steps


def main():
    key_params, key_data = jr.split(jr.PRNGKey(0))
    params = init_params(key_params)
    y0s = jr.normal(key_data, (16, STATE))
    c, s = jnp.cos(T1), jnp.sin(T1)
    rotation = jnp.array([[c, s], [-s, c]])
    targets = y0s @ rotation.T

    losses = []
    for i in range(TRAINING_STEPS):
        params, loss, num_steps = train_step(params, y0s, targets)
        losses.append(float(loss))
        print(
            f"step {i}: loss {loss:.4f}, solver steps {int(num_steps.min())}"
            f"-{int(num_steps.max())} per example"
        )
    assert losses[-1] < 0.5 * losses[0], losses

    # What the last gradient cost: the batch ran in lock-step for the longest solve.
    plan = loopax.schedule(int(num_steps.max()), CHECKPOINTS)
    print(
        f"one gradient: {plan.num_forward} forward steps, {plan.num_recomputed} "
        f"recomputed, {plan.num_vjp} VJPs, {CHECKPOINTS} stored states"
    )


if __name__ == "__main__":
    main()
