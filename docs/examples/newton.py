"""Differentiate through Newton's method, which stops when the residual is small.

Kepler's equation `E - e sin(E) = M` gives the eccentric anomaly `E` of an orbit with
eccentricity `e` at mean anomaly `M`. There is no closed form; Newton's method solves it
in a number of iterations that depends on `M` and `e`, so it is a while loop that stops on
a tolerance. We differentiate the solver itself (the loop, unrolled by loopax) in reverse
and in forward mode, and compare with the derivatives the implicit function theorem gives:
`dE/dM = 1 / (1 - e cos E)` and `dE/de = sin(E) / (1 - e cos E)`.

Run: `python docs/examples/newton.py`.
"""

import jax
import jax.numpy as jnp

import loopax


TOLERANCE = 1e-6
MAX_STEPS = 50  # A safety bound: stop after 50 iterations even if not converged.


def residual(E, M, e):
    return E - e * jnp.sin(E) - M


def solve_kepler(M, e, *, kind="checkpointed"):
    """Return `(E, iterations)` with `E - e sin(E) = M` to within `TOLERANCE`."""

    def cond_fun(carry):
        E, _ = carry
        return jnp.abs(residual(E, M, e)) > TOLERANCE

    def body_fun(carry):
        E, iterations = carry
        E = E - residual(E, M, e) / (1 - e * jnp.cos(E))
        return E, iterations + 1

    # With `max_steps` and no `checkpoints`, the checkpointed kind stores
    # ceil(log2(MAX_STEPS + 1)) = 6 states; `kind="bounded"` needs `max_steps` to size
    # its nested scans.
    return loopax.while_loop(
        cond_fun, body_fun, (M, jnp.array(0)), kind=kind, max_steps=MAX_STEPS
    )


def main():
    M = jnp.linspace(0.1, 3.0, 8)
    e = jnp.array(0.8)
    E, iterations = jax.vmap(solve_kepler, in_axes=(0, None))(M, e)
    print("E          ", E)
    print("iterations ", iterations)
    assert jnp.all(jnp.abs(residual(E, M, e)) <= TOLERANCE)

    # Reverse mode through the loop (one gradient per M, under vmap: in lock-step).
    def E_of(M, e, kind):
        return solve_kepler(M, e, kind=kind)[0]

    dE_dM, dE_de = jax.vmap(jax.grad(E_of, argnums=(0, 1)), in_axes=(0, None, None))(
        M, e, "checkpointed"
    )
    # Forward mode needs a kind that supports it: "lax" (forward only) or "bounded".
    dE_dM_fwd = jax.vmap(jax.jacfwd(E_of), in_axes=(0, None, None))(M, e, "bounded")

    # The implicit function theorem, for comparison.
    denominator = 1 - e * jnp.cos(E)
    print("dE/dM loop     ", dE_dM)
    print("dE/dM implicit ", 1 / denominator)
    print("dE/de loop     ", dE_de)
    print("dE/de implicit ", jnp.sin(E) / denominator)
    assert jnp.allclose(dE_dM, 1 / denominator, rtol=1e-3, atol=1e-5)
    assert jnp.allclose(dE_de, jnp.sin(E) / denominator, rtol=1e-3, atol=1e-5)
    assert jnp.allclose(dE_dM_fwd, dE_dM, rtol=1e-3, atol=1e-5)


if __name__ == "__main__":
    main()
