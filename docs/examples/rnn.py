"""Train a recurrent network with `loopax.scan`, storing 8 hidden states instead of 200.

An Elman RNN reads a noisy sine wave one sample per step and predicts the next sample.
`jax.lax.scan` would keep every hidden state (and each step's intermediate values) for
the backward pass; `loopax.scan` keeps `checkpoints` of them and recomputes the rest.
Because a scan's length is known up front, the checkpoints are placed by revolve
(Griewank and Walther), which recomputes as few steps as possible. The gradient is the
same as `lax.scan`'s.

Run: `python docs/examples/rnn.py`.
"""

import functools as ft

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr

import loopax


HIDDEN, LENGTH, CHECKPOINTS = 32, 200, 8
LEARNING_RATE = 0.1
TRAINING_STEPS = 20


def init_params(key):
    k1, k2, k3 = jr.split(key, 3)
    return {
        "W": 0.9 * jr.normal(k1, (HIDDEN, HIDDEN)) / HIDDEN**0.5,
        "U": jr.normal(k2, (HIDDEN,)),
        "b": jnp.zeros(HIDDEN),
        "V": 0.1 * jr.normal(k3, (HIDDEN,)) / HIDDEN**0.5,
    }


# `loopax.scan` takes `jax.lax.scan`'s arguments, plus how many carries to store.
checkpointed_scan = ft.partial(loopax.scan, checkpoints=CHECKPOINTS)


def loss_fn(params, xs, scan):
    """Mean squared error of predicting `xs[t + 1]` from `xs[: t + 1]`."""

    def step(h, x):
        h = jnp.tanh(params["W"] @ h + params["U"] * x + params["b"])
        return h, params["V"] @ h  # (new carry, this step's prediction)

    _, predictions = scan(step, jnp.zeros(HIDDEN), xs[:-1])
    return jnp.mean((predictions - xs[1:]) ** 2)


loss_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)


def main():
    key_params, key_noise = jr.split(jr.PRNGKey(0))
    params = init_params(key_params)
    t = jnp.linspace(0, 8 * jnp.pi, LENGTH + 1)
    xs = jnp.sin(t) + 0.05 * jr.normal(key_noise, t.shape)

    # Same gradient as `lax.scan`, which stores all 200 steps.
    _, grads = loss_and_grad(params, xs, checkpointed_scan)
    _, expected = loss_and_grad(params, xs, lax.scan)
    for name in params:
        assert jnp.allclose(grads[name], expected[name], rtol=1e-4, atol=1e-6), name

    losses = []
    for i in range(TRAINING_STEPS):
        loss, grads = loss_and_grad(params, xs, checkpointed_scan)
        params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        losses.append(float(loss))
        if i % 5 == 0 or i == TRAINING_STEPS - 1:
            print(f"step {i}: loss {loss:.4f}")
    assert losses[-1] < 0.5 * losses[0], losses

    plan = loopax.schedule(LENGTH, CHECKPOINTS, known_length=True)
    print(
        f"one gradient: {plan.num_forward} forward steps, {plan.num_recomputed} "
        f"recomputed, {plan.num_vjp} VJPs,\n{CHECKPOINTS} stored hidden states "
        f"(lax.scan: {LENGTH})"
    )


if __name__ == "__main__":
    main()
