"""`kind="checkpointed"`: exact gradients, the transformations users rely on, and an
exact replay of the checkpoint schedule by `loopax._schedule.schedule`.

Compilation dominates the run time, so jitted functions are built once per static
configuration (`checkpoints`, `max_steps`) and cached; the trip count `n` is a traced
argument.
"""

import functools as ft
import re

import jax
import jax.numpy as jnp
import jax.test_util as jtest
import numpy as np
import pytest
from helpers import (
    assert_tree_allclose,
    bounded_lax_loop,
    mixed_body,
    mixed_carry,
    mixed_cond,
    scan_reference_loop,
)

import loopax
import loopax._schedule.online  # test hook: the length of the trace-time table


W = jnp.array([[0.9, 0.2], [-0.3, 0.8]])
X0 = jnp.array([0.5, -1.0])
BOUND = 40  # The reference's scan length: larger than every trip count used.


def _int(x):
    return jnp.array(x, jnp.int32)


def _cond(c):
    return c[0] < c[2]


def _body(c):
    i, x, n = c
    return i + 1, jnp.tanh(W @ x) + 0.1 * x, n


# Body evaluations of the last call of a recording loop, in execution order.
_calls: list[int] = []


def _record(step):
    _calls.append(int(step))


def _recording_body(c):
    jax.debug.callback(_record, c[0], ordered=True)
    return _body(c)


def _init(x, n):
    return _int(0), x, n


def _loss(x, n, checkpoints, max_steps, body=_body):
    out = loopax.while_loop(
        _cond,
        body,
        _init(x, n),
        kind="checkpointed",
        checkpoints=checkpoints,
        max_steps=max_steps,
    )
    return jnp.sum(out[1])


def _ref_loss(x, n, max_steps):
    out = scan_reference_loop(_cond, _body, _init(x, n), max_steps)
    return jnp.sum(out[1])


@ft.cache
def _grad(checkpoints, max_steps, jit=True):
    """`jax.grad` of the loss wrt `x`; the body records its evaluations in `_calls`."""
    loss = ft.partial(
        _loss, checkpoints=checkpoints, max_steps=max_steps, body=_recording_body
    )
    return jax.jit(jax.grad(loss)) if jit else jax.grad(loss)


@ft.cache
def _ref_grad(max_steps=BOUND):
    return jax.jit(jax.grad(ft.partial(_ref_loss, max_steps=max_steps)))


def _recorded_grad(checkpoints, max_steps, n):
    """The gradient, and the steps of the body evaluations it performed, in order."""
    _calls.clear()
    grad = jax.block_until_ready(_grad(checkpoints, max_steps)(X0, _int(n)))
    jax.effects_barrier()
    return grad, list(_calls)


def _is_store_all(checkpoints, max_steps):
    return max_steps is not None and checkpoints >= max_steps


# (checkpoints, max_steps): c = 40 exceeds every n without a bound; c >= max_steps is
# the store-all path; max_steps = 10 clips the longer loops.
CASES = [
    *[(c, m) for c in (1, 2, 3, 8) for m in (None, BOUND)],
    (BOUND, None),
    (3, 10),
    (BOUND, BOUND),
    (64, BOUND),
    (10, 10),
]
NUM_STEPS = (0, 1, 2, 5, 13, 30)


# -- gradients against the full-storage reference -------------------------------------


@pytest.mark.parametrize("checkpoints, max_steps", CASES)
def test_grad_matches_reference(checkpoints, max_steps):
    ref = _ref_grad(BOUND if max_steps is None else max_steps)
    for n in NUM_STEPS:
        grad, _ = _recorded_grad(checkpoints, max_steps, n)
        assert_tree_allclose(grad, ref(X0, _int(n)), atol=1e-5)


@pytest.mark.parametrize("checkpoints, max_steps", [(2, None), (BOUND, BOUND)])
def test_grad_matches_reference_without_jit(checkpoints, max_steps):
    grad = _grad(checkpoints, max_steps, jit=False)
    assert_tree_allclose(grad(X0, _int(5)), _ref_grad()(X0, _int(5)), atol=1e-5)


def test_check_grads_finite_differences():
    jtest.check_grads(
        jax.jit(lambda x: _loss(x, _int(6), 2, None)),
        (X0,),
        order=1,
        modes=["rev"],
        eps=1e-2,
        atol=2e-2,
        rtol=2e-2,
    )


def test_default_checkpoints_from_max_steps():
    grad = _grad(None, BOUND)
    for n in (0, 5, 17):
        assert_tree_allclose(grad(X0, _int(n)), _ref_grad()(X0, _int(n)), atol=1e-5)


@pytest.mark.parametrize("checkpoints", [None, 1, 3])
def test_max_steps_zero_under_grad(checkpoints):
    """`max_steps=0` runs no step: the gradient is the identity's, not a crash from
    writing a per-step stack with no rows."""
    grad = jax.grad(lambda x: _loss(x, _int(5), checkpoints, 0))(X0)
    assert_tree_allclose(grad, jnp.ones_like(X0))


def test_neither_checkpoints_nor_max_steps():
    value = jax.jit(ft.partial(_loss, checkpoints=None, max_steps=None))(X0, _int(5))
    np.testing.assert_allclose(value, _ref_loss(X0, _int(5), BOUND), rtol=1e-6)
    message = re.escape("checkpoints=") + ".*" + re.escape("max_steps=")
    with pytest.raises(ValueError, match=message):
        jax.grad(_loss)(X0, _int(5), None, None)
    # `jax.vjp` linearizes (as `jax.linearize` may); the error comes with the transpose.
    out, f_vjp = jax.vjp(lambda x: _loss(x, _int(5), None, None), X0)
    with pytest.raises(ValueError, match=message):
        f_vjp(jnp.ones_like(out))


# -- what gets differentiated ---------------------------------------------------------


def _mlp_body(params):
    w1, b1, w2 = params

    def body(c):
        i, y, n = c
        return i + 1, y + 0.1 * (w2 @ jnp.tanh(w1 @ y + b1)), n

    return body


def _mlp_params(getkey):
    k1, k2, k3 = (getkey() for _ in range(3))
    return (
        jax.random.normal(k1, (4, 2)),
        jax.random.normal(k2, (4,)),
        jax.random.normal(k3, (2, 4)),
    )


@pytest.mark.parametrize("checkpoints, max_steps", [(2, None), (12, 12)])
def test_closed_over_mlp_weights(getkey, checkpoints, max_steps):
    def loss(params, x, n):
        out = loopax.while_loop(
            _cond,
            _mlp_body(params),
            _init(x, n),
            checkpoints=checkpoints,
            max_steps=max_steps,
        )
        return jnp.sum(out[1] ** 2)

    def ref(params, x, n):
        out = scan_reference_loop(_cond, _mlp_body(params), _init(x, n), 12)
        return jnp.sum(out[1] ** 2)

    params = _mlp_params(getkey)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    ref_grad = jax.jit(jax.grad(ref, argnums=(0, 1)))
    for n in (0, 3, 9):
        assert_tree_allclose(
            grad(params, X0, _int(n)), ref_grad(params, X0, _int(n)), atol=1e-5
        )


def _int_bool_body(c):
    i, x, flag, count, const, n = c
    x = jnp.where(flag, jnp.sin(x), jnp.cos(x)) * 1.2
    return i + 1, x, ~flag, count + flag.astype(jnp.int32), const, n


def _int_bool_init(x, n):
    return _int(0), x, jnp.array(True), _int(0), jnp.array(3.0), n


def test_int_and_bool_leaves():
    def loss(x, n):
        out = loopax.while_loop(
            lambda c: c[0] < c[-1], _int_bool_body, _int_bool_init(x, n), checkpoints=2
        )
        return jnp.sum(out[1]) * out[4] + out[3].astype(jnp.float32)

    def ref(x, n):
        out = scan_reference_loop(
            lambda c: c[0] < c[-1], _int_bool_body, _int_bool_init(x, n), 12
        )
        return jnp.sum(out[1]) * out[4] + out[3].astype(jnp.float32)

    # Their cotangents are float0 / symbolic zeros: nothing to differentiate.
    grad = jax.jit(jax.grad(loss))
    for n in (0, 1, 7):
        assert_tree_allclose(grad(X0, _int(n)), jax.grad(ref)(X0, _int(n)), atol=1e-5)


def test_vjp_and_jacrev_of_vector_output():
    def f(x):
        return loopax.while_loop(_cond, _body, _init(x, _int(9)), checkpoints=2)[1]

    def ref(x):
        return scan_reference_loop(_cond, _body, _init(x, _int(9)), BOUND)[1]

    def jacrev_and_vjp(f, x, ct):
        out, vjp = jax.vjp(f, x)
        return jax.jacrev(f)(x), out, vjp(ct)

    ct = jnp.array([1.0, -2.0])
    got = jax.jit(ft.partial(jacrev_and_vjp, f))(X0, ct)
    assert_tree_allclose(got, jacrev_and_vjp(ref, X0, ct), atol=1e-5)


BATCH_NS = jnp.array([3, 9, 0, 14], jnp.int32)
BATCH_XS = jnp.stack([X0, -X0, 2 * X0, X0 + 1.0])


@pytest.mark.parametrize("checkpoints, max_steps", [(3, None), (BOUND, BOUND)])
def test_vmap_of_grad_batched_stop(checkpoints, max_steps):
    grad = jax.grad(ft.partial(_loss, checkpoints=checkpoints, max_steps=max_steps))
    got = jax.jit(jax.vmap(grad))(BATCH_XS, BATCH_NS)
    assert_tree_allclose(got, jax.vmap(_ref_grad())(BATCH_XS, BATCH_NS), atol=1e-5)


@pytest.mark.parametrize("checkpoints, max_steps", [(3, None), (BOUND, BOUND)])
def test_grad_of_vmap_batched_stop(checkpoints, max_steps):
    loss = ft.partial(_loss, checkpoints=checkpoints, max_steps=max_steps)

    def batched(loss):
        return lambda x: jnp.sum(jax.vmap(loss, (None, 0))(x, BATCH_NS))

    got = jax.jit(jax.grad(batched(loss)))(X0)
    want = jax.grad(batched(ft.partial(_ref_loss, max_steps=BOUND)))(X0)
    assert_tree_allclose(got, want, atol=1e-5)


def _nested_outer_body(inner_loop):
    def outer_body(c):
        j, x, n = c
        # The inner trip count depends on the outer step: 1, 2, 3, 1, 2, 3, ...
        _, x = inner_loop(
            lambda d: d[0] < j % 3 + 1,
            lambda d: (d[0] + 1, jnp.tanh(W @ d[1]) + 0.2 * d[1]),
            (_int(0), x),
        )
        return j + 1, x * 0.9, n

    return outer_body


@pytest.mark.parametrize("outer_checkpoints, inner_checkpoints", [(1, 2)])
def test_nested_checkpointed_loops(outer_checkpoints, inner_checkpoints):
    def inner(cond, body, init):
        return loopax.while_loop(cond, body, init, checkpoints=inner_checkpoints)

    def loss(x, n):
        out = loopax.while_loop(
            _cond, _nested_outer_body(inner), _init(x, n), checkpoints=outer_checkpoints
        )
        return jnp.sum(out[1])

    def ref(x, n):
        body = _nested_outer_body(lambda c, b, i: scan_reference_loop(c, b, i, 3))
        return jnp.sum(scan_reference_loop(_cond, body, _init(x, n), 8)[1])

    grad, ref_grad = jax.jit(jax.grad(loss)), jax.jit(jax.grad(ref))
    for n in (0, 1, 6):
        np.testing.assert_allclose(loss(X0, _int(n)), ref(X0, _int(n)), rtol=1e-5)
        assert_tree_allclose(grad(X0, _int(n)), ref_grad(X0, _int(n)), atol=1e-5)


# -- buffers --------------------------------------------------------------------------

BUF_LEN = 12


def _buf_cond(c):
    return c[0] < c[3]


def _buf_body(c):
    i, x, buf, n = c
    # Read an index written at an earlier step (0.0 at the start, or if it was masked).
    prev = jnp.where(i > 0, buf[jnp.maximum(i - 1, 0)], 0.0)
    x = jnp.sin(x) * 1.3 + 0.1 * prev
    buf = loopax.buffer_at_set(buf, i, x, pred=i % 3 != 1)
    return i + 1, x, buf, n


def _buf_loss(loop):
    def loss(x, n):
        out = loop(_buf_cond, _buf_body, (_int(0), x, jnp.zeros(BUF_LEN), n))
        return out[2] @ jnp.arange(1.0, BUF_LEN + 1) + out[1]

    return loss


@pytest.mark.parametrize("checkpoints", [1, 3, BUF_LEN])
def test_buffer_masked_writes_and_reads(checkpoints):
    loss = _buf_loss(
        ft.partial(
            loopax.while_loop,
            checkpoints=checkpoints,
            max_steps=BUF_LEN,
            buffers=lambda c: c[2],
        )
    )
    ref = _buf_loss(lambda c, b, i: scan_reference_loop(c, b, i, BUF_LEN))
    x = jnp.float32(0.4)
    grad, ref_grad = jax.jit(jax.value_and_grad(loss)), jax.jit(jax.value_and_grad(ref))
    for n in (0, 1, 5, BUF_LEN):
        assert_tree_allclose(grad(x, _int(n)), ref_grad(x, _int(n)), atol=1e-5)
    if checkpoints != 3:
        return
    got = jax.jit(jax.vmap(jax.grad(loss), (None, 0)))(x, BATCH_NS % BUF_LEN)
    want = jax.vmap(jax.grad(ref), (None, 0))(x, BATCH_NS % BUF_LEN)
    assert_tree_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("checkpoints, max_steps", [(2, None), (8, 8)])
def test_grad_wrt_initial_buffer(checkpoints, max_steps):
    def body(c):
        i, buf, y = c
        return i + 1, buf.at[i].set(y * 2.0), y * 1.1

    def loss(loop, buf0, y):
        out = loop(lambda c: c[0] < 5, body, (_int(0), buf0, y))
        return jnp.sum(out[1] * jnp.arange(8.0)) + out[2]

    loop = ft.partial(
        loopax.while_loop,
        checkpoints=checkpoints,
        max_steps=max_steps,
        buffers=lambda c: c[1],
    )
    got = jax.jit(jax.grad(ft.partial(loss, loop), argnums=(0, 1)))(
        jnp.ones(8), jnp.float32(1.0)
    )
    ref = jax.grad(
        ft.partial(loss, lambda c, b, i: scan_reference_loop(c, b, i, 8)),
        argnums=(0, 1),
    )(jnp.ones(8), jnp.float32(1.0))
    assert_tree_allclose(got, ref, atol=1e-5)
    # Entries 0..4 are overwritten: their initial values get a zero cotangent.
    np.testing.assert_array_equal(got[0], [0, 0, 0, 0, 0, 5, 6, 7])


def _nested_buffer_loss(loop, x):
    def outer_body(oc):
        j, buf, y = oc

        def inner_body(ic):
            k, b, z = ic
            return k + 1, b.at[j * 3 + k].set(z), jnp.cos(z)

        _, buf, y = loop(lambda ic: ic[0] < 3, inner_body, (_int(0), buf, y))
        return j + 1, buf, y

    out = loop(lambda oc: oc[0] < 4, outer_body, (_int(0), jnp.zeros(12), x))
    return out[1] @ jnp.arange(12.0) + out[2]


@pytest.mark.parametrize("checkpoints", [1, 2])
def test_outer_buffer_as_inner_buffer(checkpoints):
    loop = ft.partial(
        loopax.while_loop, checkpoints=checkpoints, buffers=lambda c: c[1]
    )
    ref_loop = lambda c, b, i: scan_reference_loop(c, b, i, 4)  # noqa: E731
    x = jnp.float32(0.4)
    got = jax.jit(jax.value_and_grad(ft.partial(_nested_buffer_loss, loop)))(x)
    want = jax.value_and_grad(ft.partial(_nested_buffer_loss, ref_loop))(x)
    assert_tree_allclose(got, want, atol=1e-5)


# -- undifferentiated values ----------------------------------------------------------


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("checkpoints, max_steps", [(2, None), (3, 4), (8, 8)])
def test_mixed_dtypes_match_lax(checkpoints, max_steps, jit):
    def run(init):
        return loopax.while_loop(
            mixed_cond,
            mixed_body,
            init,
            kind="checkpointed",
            checkpoints=checkpoints,
            max_steps=max_steps,
        )

    init = jax.tree_util.tree_map(jnp.asarray, mixed_carry(6))
    want = bounded_lax_loop(mixed_cond, mixed_body, init, max_steps)
    assert_tree_allclose((jax.jit(run) if jit else run)(init), want)

    if not jit:
        return

    # The forward sweep under reverse mode returns the same values.
    def from_floats(f32, half):
        return run({**init, "half": half, "nested": (f32, init["nested"][1])})

    out = jax.jit(lambda *a: jax.vjp(from_floats, *a)[0])(
        init["nested"][0], init["half"]
    )
    assert_tree_allclose(out, want)


# -- the schedule replay is exact -----------------------------------------------------


@pytest.mark.parametrize("checkpoints, max_steps", CASES)
def test_replay_matches_compiled_grad(checkpoints, max_steps):
    for n in NUM_STEPS:
        plan = loopax.schedule(n, checkpoints, max_steps=max_steps)
        _, calls = _recorded_grad(checkpoints, max_steps, n)
        assert tuple(calls) == plan.body_calls, (n, checkpoints, max_steps)
        if plan.stores_residuals:
            assert len(calls) == plan.num_forward
        else:
            assert len(calls) == plan.total_evaluations


@pytest.mark.parametrize(
    "checkpoints, max_steps", [c for c in CASES if _is_store_all(*c)]
)
def test_store_all_runs_body_once_per_step(checkpoints, max_steps):
    for n in NUM_STEPS:
        plan = loopax.schedule(n, checkpoints, max_steps=max_steps)
        assert plan.num_recomputed == 0
        _, calls = _recorded_grad(checkpoints, max_steps, n)
        assert calls == list(range(plan.num_steps))


def _count_in_grad_jaxpr(checkpoints, max_steps, primitive="tanh"):
    jaxpr = jax.make_jaxpr(_grad(checkpoints, max_steps, jit=False))(X0, _int(5))
    return len(re.findall(rf"\b{primitive}\b", str(jaxpr)))


@pytest.mark.parametrize("max_steps", [None, 100])
def test_body_traced_independently_of_checkpoints(max_steps):
    few, many = (_count_in_grad_jaxpr(c, max_steps) for c in (4, 64))
    assert few == many > 0


def test_bounded_loop_gets_a_table_of_every_step(monkeypatch):
    """A loop bounded by `max_steps` within the trace-time table's length looks every
    decision up in the table, so the online rule is not compiled in (the gradient's
    program is smaller than with the rule), and the body-call order is still the
    replay's past the usual table length."""
    checkpoints, max_steps, n = 2, 60, 50
    online = loopax._schedule.online
    monkeypatch.setattr(online, "ONLINE_TABLE_STEPS", 8)
    jax.clear_caches()  # The lowering of the loop is cached.
    with_rule = _grad(checkpoints, max_steps).lower(X0, _int(n)).as_text()
    monkeypatch.setattr(online, "ONLINE_TABLE_STEPS", max_steps)
    jax.clear_caches()
    without_rule = _grad(checkpoints, max_steps).lower(X0, _int(n)).as_text()
    assert len(without_rule) < 0.9 * len(with_rule)
    got, calls = _recorded_grad(checkpoints, max_steps, n)
    assert (
        tuple(calls) == loopax.schedule(n, checkpoints, max_steps=max_steps).body_calls
    )
    assert_tree_allclose(got, _ref_grad(max_steps)(X0, _int(n)), atol=1e-5)
    jax.clear_caches()  # No lowering with the shrunk tables outlives the test.


def test_many_slots_use_the_whole_decision_table():
    """With more than 512 slots the trace-time table holds its full 16384 steps
    (building it is O(c) since the stores right after the fill are found in O(1)
    each): a loop of 2500 steps with 600 slots, past the fill's trivial stores, runs
    the replay's body calls and has the reference's gradient."""
    checkpoints, n = 600, 2500
    assert loopax._schedule.online.online_table_length(None, checkpoints) == 16384
    got, calls = _recorded_grad(checkpoints, None, n)
    assert tuple(calls) == loopax.schedule(n, checkpoints).body_calls
    assert_tree_allclose(got, _ref_grad(n + 1)(X0, _int(n)), atol=1e-5)


@pytest.mark.parametrize(
    "checkpoints, max_steps", [(3, None), (2, 20), (3, 6), (6, None), (1, None)]
)
def test_replay_past_the_online_decision_table(monkeypatch, checkpoints, max_steps):
    """The forward sweep looks the online rule's first decisions up in a table and
    runs the rule itself past it: shrink the table to 4 steps, and the body-call
    order still equals the replay (which never uses the table) and the gradient is
    right."""
    online = loopax._schedule.online
    monkeypatch.setattr(online, "ONLINE_TABLE_STEPS", 4)
    jax.clear_caches()  # The lowering of the loop is cached.
    grad = jax.jit(
        jax.grad(
            ft.partial(
                _loss,
                checkpoints=checkpoints,
                max_steps=max_steps,
                body=_recording_body,
            )
        )
    )
    bound = BOUND if max_steps is None else max_steps
    for n in (3, 13, 30, 39):
        _calls.clear()
        got = jax.block_until_ready(grad(X0, _int(n)))
        jax.effects_barrier()
        plan = loopax.schedule(n, checkpoints, max_steps=max_steps)
        assert tuple(_calls) == plan.body_calls, (n, checkpoints, max_steps)
        assert_tree_allclose(got, _ref_grad(bound)(X0, _int(n)), atol=1e-5)
    jax.clear_caches()  # No lowering with the shrunk tables outlives the test.
