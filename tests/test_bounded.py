"""`kind="bounded"`: values, every derivative, vmap and buffers against references.

Every derivative is compared with the same derivative of `scan_reference_loop` (a
`lax.scan` of `lax.cond` over `max_steps`, storing everything), which plain JAX
differentiates independently of loopax. Sizes stay small: `base=4` so that
`max_steps=100` already nests three levels. The bound is checked exactly: the body is
never called past step `max_steps - 1`, forward or under `grad`.
"""

import collections
import functools as ft
import math

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.test_util
import pytest
from helpers import (
    assert_tree_allclose,
    bounded_lax_loop,
    mixed_body,
    mixed_carry,
    mixed_cond,
    python_loop,
    scan_reference_loop,
)

import loopax
from loopax._schedule import bounded_plan as plan


BASE = 4
# 0 and 1 run nothing or one step; BASE and BASE + 1 are flat scans; 11 nests two
# levels of 4 (16 slots, 5 never run); 100 nests three levels of 5 (125 slots).
MAX_STEPS = (0, 1, BASE, BASE + 1, 11, 100)


def bounded(cond_fun, body_fun, init_val, max_steps, **kwargs):
    return loopax.while_loop(
        cond_fun,
        body_fun,
        init_val,
        kind="bounded",
        max_steps=max_steps,
        base=BASE,
        **kwargs,
    )


# -- the plan --------------------------------------------------------------------------


@pytest.mark.parametrize("base", [2, 3, 4, 16])
def test_plan_covers_max_steps_with_equal_levels(base):
    previous_depth = 1
    for max_steps in range(1, 3 * base**3):
        length, depth = plan(max_steps, base)
        assert (length - 1) ** depth < max_steps <= length**depth
        # The fewest levels with max_steps < 2 * base**depth.
        assert max_steps < 2 * base**depth
        assert depth == 1 or 2 * base ** (depth - 1) <= max_steps
        assert depth >= previous_depth  # Depth never decreases as max_steps grows.
        previous_depth = depth
        assert length <= math.ceil(2 ** (1 / depth) * base)
        if depth == 1:
            assert length == max_steps  # A flat loop is one scan of exactly max_steps.
    # No extra level (a whole recomputation) just past a power of `base`.
    for k in range(1, 4):
        assert plan(base**k + 1, base)[1] == plan(base**k, base)[1]


# -- forward values -------------------------------------------------------------------


@pytest.mark.parametrize("max_steps", MAX_STEPS)
@pytest.mark.parametrize("num_steps", [3, 7])
def test_mixed_dtypes_match_lax(max_steps, num_steps):
    init = mixed_carry(num_steps)
    out = jax.jit(ft.partial(bounded, mixed_cond, mixed_body, max_steps=max_steps))(
        init
    )
    expected = bounded_lax_loop(mixed_cond, mixed_body, init, max_steps)
    assert_tree_allclose(out, expected, rtol=1e-3)
    assert int(out["i"]) == min(num_steps, max_steps)


def test_disable_jit_matches_python():
    init = mixed_carry(6)
    with jax.disable_jit():
        out = bounded(mixed_cond, mixed_body, init, BASE + 1)
    assert_tree_allclose(out, python_loop(mixed_cond, mixed_body, init, BASE + 1))


@pytest.mark.parametrize("num_steps", [0, 3, 37, 200])
def test_body_runs_only_the_real_steps(num_steps):
    """The early exit skips steps: the body *executes* `min(n, max_steps)` times."""
    calls = []

    def body(c):
        jax.debug.callback(lambda: calls.append(None), ordered=True)
        return c + 1

    out = jax.jit(lambda c: bounded(lambda c: c < num_steps, body, c, 100))(0)
    jax.effects_barrier()
    assert int(out) == min(num_steps, 100)
    assert len(calls) == min(num_steps, 100)


@pytest.mark.parametrize("max_steps", [*MAX_STEPS, 1000])
@pytest.mark.parametrize("mode", ["forward", "grad"])
def test_body_is_never_called_past_max_steps(max_steps, mode):
    """The bound is exact although the scans have `length**depth >= max_steps` slots:
    the body is never called with step index `max_steps` or more, even where it would
    misbehave there (here: divide by zero). Forward, it runs exactly once per step."""
    calls = []

    def body(carry):
        i, x = carry
        jax.debug.callback(lambda i: calls.append(int(i)), i, ordered=True)
        return i + 1, x + 1.0 / (max_steps - i).astype(x.dtype)

    def run(x):
        init = (jnp.array(0), x)
        return bounded(lambda c: c[0] >= 0, body, init, max_steps)[1]

    x0 = jnp.array(0.5)
    if mode == "forward":
        out = jax.jit(run)(x0)
    else:
        out = jax.jit(jax.grad(run))(x0)
    jax.effects_barrier()
    assert jnp.isfinite(out)
    if mode == "forward":
        assert calls == list(range(max_steps))
    else:
        # Each step is evaluated once per level (the forward sweep, then once per
        # checkpointed level while recomputing); the backward pass also replays the
        # innermost step's effects (this callback), though not its values.
        depth = plan(max_steps, BASE)[1] if max_steps else 0
        counts = collections.Counter(calls)
        assert set(counts) == set(range(max_steps))
        assert all(depth <= n <= depth + 1 for n in counts.values())


def test_body_is_traced_once():
    traces = []

    def body(c):
        traces.append(None)
        return c * 1.01

    def loss(x):
        return bounded(lambda c: c[0] < 50.0, body, x, 1000)

    jax.grad(lambda x: jnp.sum(loss(x)))(jnp.ones(2))
    assert len(traces) == 1


# -- derivatives ----------------------------------------------------------------------
# The body closes over `params`; its carry has an int counter.


def _init_params(key):
    k1, k2 = jr.split(key)
    weight = jr.normal(k1, (3, 3)) / 2
    scale = jnp.array(0.9)
    return weight, scale


def _loop(loop_fn, max_steps, num_steps, params, x0):
    weight, scale = params

    def cond_fun(carry):
        i, x = carry
        return (i < num_steps) & (jnp.sum(x**2) < 1e3)

    def body_fun(carry):
        i, x = carry
        return i + 1, scale * jnp.tanh(weight @ x) + 0.5 * x

    if loop_fn is bounded:
        return bounded(cond_fun, body_fun, (jnp.array(0), x0), max_steps)[1]
    return scan_reference_loop(cond_fun, body_fun, (jnp.array(0), x0), max_steps)[1]


def _loss(loop_fn, max_steps, num_steps, params, x0):
    x = _loop(loop_fn, max_steps, num_steps, params, x0)
    return jnp.sum(jnp.sin(x) * jnp.arange(1.0, 4.0))


_TRANSFORMS = {
    "grad": lambda f: jax.grad(f, argnums=(0, 1)),
    "jacrev": lambda f: jax.jacrev(f, argnums=(0, 1)),
    "jacfwd": lambda f: jax.jacfwd(f, argnums=(0, 1)),
    "jvp": lambda f: (
        lambda p, x: jax.jvp(
            f, (p, x), (jax.tree_util.tree_map(jnp.ones_like, p), jnp.ones_like(x))
        )
    ),
    "hessian": lambda f: jax.hessian(f, argnums=1),
    "grad_of_grad": lambda f: jax.grad(
        lambda p, x: jnp.sum(jax.grad(f, argnums=1)(p, x) ** 2), argnums=(0, 1)
    ),
}


# Every transform at the bounds that nest (11: two levels, 100: three); the
# cheap ones at the bounds whose structure is a single flat scan (or nothing).
_DERIVATIVE_CASES = [
    (transform, max_steps)
    for max_steps in MAX_STEPS
    for transform in _TRANSFORMS
    if max_steps > 2 * BASE or transform in ("grad", "jvp")
]


@pytest.mark.parametrize("transform, max_steps", _DERIVATIVE_CASES)
def test_derivatives_match_full_storage_reference(transform, max_steps, getkey):
    # Loss is vector-valued for jacrev/jacfwd, scalar otherwise.
    if transform in ("jacrev", "jacfwd"):
        loss = _loop
    else:
        loss = _loss
    params, x0 = _init_params(getkey()), jr.normal(getkey(), (3,))
    # Stops by itself (num_steps=7) below the larger bounds, is cut at the others.
    ours = jax.jit(_TRANSFORMS[transform](ft.partial(loss, bounded, max_steps, 7)))
    ref = jax.jit(
        _TRANSFORMS[transform](ft.partial(loss, scan_reference_loop, max_steps, 7))
    )
    assert_tree_allclose(ours(params, x0), ref(params, x0), rtol=1e-4, atol=1e-5)


def test_grad_matches_finite_differences(getkey):
    params, x0 = _init_params(getkey()), jr.normal(getkey(), (3,))
    loss = jax.jit(ft.partial(_loss, bounded, 11, 9))
    jax.test_util.check_grads(
        loss, (params, x0), order=1, modes=("rev",), eps=1e-2, atol=2e-2, rtol=2e-2
    )


# -- vmap -----------------------------------------------------------------------------


def _batched_loop(loop_fn, max_steps, params, x0, num_steps):
    """`num_steps` is batched: each element stops at its own step."""
    return _loss(loop_fn, max_steps, num_steps, params, x0)


def test_vmap_batched_predicate_forward_and_grad(getkey):
    # Each element stops at its own step; the last one is cut by `max_steps`.
    max_steps = 100
    params = _init_params(getkey())
    xs = jr.normal(getkey(), (4, 3))
    num_steps = jnp.array([0, 2, 5, 130])
    in_axes = (None, 0, 0)

    def both(loop_fn):
        loss = ft.partial(_batched_loop, loop_fn, max_steps)
        value = jax.vmap(loss, in_axes)(params, xs, num_steps)
        per_element_grad = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes)(
            params, xs, num_steps
        )
        grad_of_sum = jax.grad(
            lambda p, x: jnp.sum(jax.vmap(loss, in_axes)(p, x, num_steps)),
            argnums=(0, 1),
        )(params, xs)
        return value, per_element_grad, grad_of_sum

    ours = jax.jit(lambda: both(bounded))()
    expected = jax.jit(lambda: both(scan_reference_loop))()
    assert_tree_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_vmap_frozen_elements_count_their_own_steps():
    def run(n):
        return bounded(
            lambda c: c[0] < n, lambda c: (c[0] + 1, c[1] * 2.0), (0, 1.0), 100
        )

    i, x = jax.jit(jax.vmap(run))(jnp.array([0, 1, 5, 150]))
    assert i.tolist() == [0, 1, 5, 100]
    assert x.tolist() == [1.0, 2.0, 32.0, 2.0**100]


# -- buffers --------------------------------------------------------------------------


def _buffer_loss(loop_fn, max_steps, scale, x0, threshold):
    """Writes `x` into row `i` of a buffer where `x[0] > threshold` (a masked write),
    and reads the previous row back (read after write)."""

    def cond_fun(carry):
        i, _, _ = carry
        return i < 9

    def body_fun(carry):
        i, x, buf = carry
        buf = loopax.buffer_at_set(buf, i, x, pred=x[0] > threshold)
        previous = buf[jnp.maximum(i - 1, 0)]
        return i + 1, scale * jnp.sin(x) + 0.1 * previous, buf

    init = (jnp.array(0), x0, jnp.zeros((12, 3)))
    if loop_fn is bounded:
        carry = bounded(cond_fun, body_fun, init, max_steps, buffers=lambda c: c[2])
    else:
        carry = scan_reference_loop(cond_fun, body_fun, init, max_steps)
    _, x, buf = carry
    return jnp.sum(x**2) + jnp.sum(jnp.cos(buf) * jnp.arange(12.0)[:, None])


@pytest.mark.parametrize("max_steps", [BASE + 1, 11])
def test_buffers_masked_writes_forward_and_grad(max_steps, getkey):
    x0 = jr.normal(getkey(), (3,))
    scale = jnp.array(1.1)

    def both(loop_fn):
        loss = ft.partial(_buffer_loss, loop_fn, max_steps)
        return jax.value_and_grad(loss, argnums=(0, 1))(scale, x0, -0.2)

    ours = jax.jit(lambda: both(bounded))()
    expected = jax.jit(lambda: both(scan_reference_loop))()
    assert_tree_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_buffers_under_vmap_with_batched_mask(getkey):
    xs = jr.normal(getkey(), (5, 3))
    thresholds = jnp.array([-10.0, 0.0, 0.3, -0.3, 10.0])
    scale = jnp.array(1.1)

    def both(loop_fn):
        loss = ft.partial(_buffer_loss, loop_fn, 100)
        return jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)), (None, 0, 0))(
            scale, xs, thresholds
        )

    ours = jax.jit(lambda: both(bounded))()
    expected = jax.jit(lambda: both(scan_reference_loop))()
    assert_tree_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_buffer_values_under_vmap():
    def run(threshold):
        def body(c):
            i, buf = c
            buf = buf.at[i].set(i * 10, pred=i > threshold)
            return i + 1, buf

        init = (jnp.array(0), jnp.full(6, -1))
        return bounded(lambda c: c[0] < 6, body, init, BASE + 1, buffers=lambda c: c[1])

    i, buf = jax.jit(jax.vmap(run))(jnp.array([-1, 2]))
    assert i.tolist() == [5, 5]
    assert buf.tolist() == [[0, 10, 20, 30, 40, -1], [-1, -1, -1, 30, 40, -1]]


# -- errors ---------------------------------------------------------------------------


def test_base_and_max_steps_errors():
    with pytest.raises(ValueError, match="`base` must be an integer >= 2, got 1"):
        loopax.while_loop(
            lambda c: c < 3, lambda c: c + 1, 0, kind="bounded", max_steps=10, base=1
        )
    with pytest.raises(ValueError, match="kind='bounded' needs `max_steps`"):
        loopax.while_loop(lambda c: c < 3, lambda c: c + 1, 0, kind="bounded")
