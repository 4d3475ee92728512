"""`loopax.scan` and `loopax.fori_loop`: the results of `lax.scan` / `lax.fori_loop`,
their gradients, and the exact optimality of the checkpointed scan's recomputation.

How loopax's counts relate to Griewank and Walther's. Revolve with `s` checkpoints
(the initial state included) reverses `l` steps with at least

    t(l, s) = r * l - beta(s + 1, r - 1),   beta(s, r) = C(s + r, s),

forward steps ("advances"), `r` the smallest integer with `beta(s, r) >= l`; each of
its `l` reverse steps runs the step's forward again inside the adjoint. A gradient
through `loopax.scan` of `n` steps with `c` checkpoint slots evaluates the body `n`
times in the forward sweep (which runs to the output `x_n`), `n` times in VJPs, and
recomputes `R` states. With `x_0` free, the forward sweep plus the backward sweep is
revolve on `n + 1` steps with `c + 1` checkpoints, whose first reverse step (of the
step after `x_n`) is not needed: `n + R = t(n + 1, c + 1)`, so the optimum is

    R = t(n + 1, c + 1) - n,    total = 2 n + R = n + t(n + 1, c + 1).

(Against `t(n, c + 1)`: the forward sweep of loopax also computes `x_n`, which revolve's
last reverse step computes instead, and it cannot keep `x_{n-1}` in a register, so the
two differ by more than a constant; e.g. n = 5, c = 1: R = 3, t(5, 2) = 6.)
"""

import functools as ft
import math

import jax
import jax.extend as jex
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose

import loopax
from loopax._schedule import revolve_cost


# -- a pytree scan ------------------------------------------------------------------

W = jnp.array([[0.9, 0.2, -0.1], [-0.3, 0.8, 0.4], [0.1, -0.5, 0.7]])
N = 9
XS = {
    "u": jnp.linspace(-1.0, 1.0, N * 3).reshape(N, 3),
    "v": (jnp.arange(N, dtype=jnp.float32) / N,),
}
INIT = {"h": jnp.array([0.5, -1.0, 0.25]), "s": jnp.float32(0.3), "k": jnp.int32(0)}


def _f(w, carry, x):
    h = jnp.tanh(w @ carry["h"] + x["u"]) + 0.1 * carry["s"]
    s = carry["s"] * 0.9 + x["v"][0] * jnp.sum(h)
    new = {"h": h, "s": s, "k": carry["k"] + 1}
    return new, (h * s, {"k": carry["k"], "e": jnp.sum(h**2)})


def _loss(scan, w, init, xs, reverse):
    carry, ys = scan(ft.partial(_f, w), init, xs, reverse=reverse)
    return (
        jnp.sum(carry["h"] ** 2)
        + carry["s"]
        + jnp.sum(ys[0] * jnp.arange(1.0, N + 1)[:, None])
        + jnp.sum(jnp.cos(ys[1]["e"]))
    )


def _loopax_scan(checkpoints):
    return ft.partial(loopax.scan, kind="checkpointed", checkpoints=checkpoints)


@ft.cache
def _value_and_grad(checkpoints, reverse):
    scan = lax.scan if checkpoints == "lax.scan" else _loopax_scan(checkpoints)
    loss = ft.partial(_loss, scan, reverse=reverse)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), allow_int=True))


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("kind", ["lax", "checkpointed"])
def test_forward_matches_lax_scan(kind, reverse):
    run = jax.jit(
        lambda w, init, xs: loopax.scan(
            ft.partial(_f, w), init, xs, reverse=reverse, kind=kind, checkpoints=2
        )
    )
    want = lax.scan(ft.partial(_f, W), INIT, XS, reverse=reverse)
    assert_tree_allclose(run(W, INIT, XS), want)
    if kind == "checkpointed" and not reverse:  # Without jit too.
        got = loopax.scan(ft.partial(_f, W), INIT, XS, kind=kind)
        assert_tree_allclose(got, want)


@pytest.mark.parametrize(
    "checkpoints, reverse",
    [(1, False), (2, True), (3, False), (N - 1, True), ("all", False), (None, True)],
)
def test_grad_matches_lax_scan(checkpoints, reverse):
    got = _value_and_grad(checkpoints, reverse)(W, INIT, XS)
    want = _value_and_grad("lax.scan", reverse)(W, INIT, XS)
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_vmap_of_grad():
    xs = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x, 0.5 * x]), XS)

    def vmapped(checkpoints):
        grad = _value_and_grad(checkpoints, True)
        return jax.jit(jax.vmap(grad, in_axes=(None, None, 0)))

    assert_tree_allclose(
        vmapped(2)(W, INIT, xs), vmapped("lax.scan")(W, INIT, xs), rtol=1e-4, atol=1e-4
    )


def test_xs_none_with_length():
    def f(c, x):
        assert x is None
        return c * 1.1 + 0.5, (c, jnp.int32(7))

    for length in (0, 5):
        want = lax.scan(f, jnp.float32(1.0), None, length=length)
        for kind in ("lax", "checkpointed"):
            got = loopax.scan(f, jnp.float32(1.0), length=length, kind=kind)
            assert_tree_allclose(got, want)
        grad = jax.grad(
            lambda c, n=length: loopax.scan(f, c, length=n, checkpoints=1)[1][0].sum()
        )(jnp.float32(1.0))
        want_grad = jax.grad(lambda c, n=length: lax.scan(f, c, length=n)[1][0].sum())(
            jnp.float32(1.0)
        )
        assert_tree_allclose(grad, want_grad)


def test_y_none_and_empty_xs():
    got = loopax.scan(lambda c, x: (c + x, None), jnp.float32(0.0), jnp.arange(4.0))
    assert_tree_allclose(got, (jnp.float32(6.0), None))
    got = loopax.scan(lambda c, x: (c, x), jnp.float32(0.0), jnp.zeros((0, 2)))
    assert_tree_allclose(got, (jnp.float32(0.0), jnp.zeros((0, 2))))


def test_lax_kind_is_a_plain_lax_scan():
    """`kind="lax"` is `lax.scan`: reverse mode stores every step, as there."""

    def loss(scan, c, reverse):
        carry, ys = scan(
            lambda c, x: (c * x, jnp.sin(c)), c, XS["v"][0], reverse=reverse
        )
        return carry + ys.sum()

    for reverse in (False, True):
        got = jax.grad(ft.partial(loss, ft.partial(loopax.scan, kind="lax")))(
            jnp.float32(1.5), reverse
        )
        want = jax.grad(ft.partial(loss, lax.scan))(jnp.float32(1.5), reverse)
        assert_tree_allclose(got, want)
    # Forward mode works.
    jvp = jax.jvp(
        lambda c: loopax.scan(lambda c, x: (c * x, c), c, XS["v"][0], kind="lax"),
        (jnp.float32(1.0),),
        (jnp.float32(1.0),),
    )
    want = jax.jvp(
        lambda c: lax.scan(lambda c, x: (c * x, c), c, XS["v"][0]),
        (jnp.float32(1.0),),
        (jnp.float32(1.0),),
    )
    assert_tree_allclose(jvp, want)


def test_user_buffers_in_carry():
    def f(c, x):
        i, buf, y = c
        return (i + 1, buf.at[i].set(y * x), jnp.sin(y)), y

    def loss(scan, y):
        (_, buf, y), ys = scan(f, (jnp.int32(0), jnp.zeros(N), y), XS["v"][0])
        return jnp.sum(buf * jnp.arange(N, dtype=jnp.float32)) + y + jnp.sum(ys)

    got = jax.value_and_grad(
        ft.partial(loss, ft.partial(loopax.scan, checkpoints=2, buffers=lambda c: c[1]))
    )(jnp.float32(0.7))
    assert_tree_allclose(
        got, jax.value_and_grad(ft.partial(loss, lax.scan))(jnp.float32(0.7))
    )


# -- the recomputation is the Griewank-Walther optimum ------------------------------


def _beta(s: int, r: int) -> int:
    return 0 if r < 0 else math.comb(s + r, s)


def _t_closed_form(length: int, s: int) -> int:
    """Revolve's minimal number of advances, `s` checkpoints (initial one included)."""
    r = 0
    while _beta(s, r) < length:
        r += 1
    return r * length - _beta(s + 1, r - 1)


@ft.cache
def _t_brute_force(length: int, s: int) -> int:
    """Advance `j`, store, reverse the tail with `s - 1` checkpoints, then the head
    with `s`; a single step needs no advance; one checkpoint: advance from the start
    before every reverse step."""
    if length <= 1:
        return 0
    if s == 1:
        return length * (length - 1) // 2
    return min(
        j + _t_brute_force(length - j, s - 1) + _t_brute_force(j, s)
        for j in range(1, length)
    )


@ft.cache
def _best_placement(length: int, free: int) -> int:
    """loopax's model by brute force: the fewest recomputations after a forward
    sweep over `length` steps from a stored state with `free` slots, each stretch
    between stored states reversed optimally with the slots free at that time."""
    best = revolve_cost(length, free)
    for j in range(1, length) if free >= 1 else ():
        best = min(best, revolve_cost(j, free) + _best_placement(length - j, free - 1))
    return best


def test_closed_form_matches_brute_force():
    for length in range(1, 62):
        for s in range(1, 8):
            assert _t_closed_form(length, s) == _t_brute_force(length, s), (length, s)


def test_optimum_of_loopax_model():
    for n in range(61):
        for c in range(1, 7):
            optimum = _t_closed_form(n + 1, c + 1) - n if n else 0
            assert _best_placement(n, c) == optimum, (n, c)


def test_replay_recomputes_the_optimum():
    for n in range(61):
        for c in range(1, 7):
            plan = loopax.schedule(n, c, max_steps=n, known_length=True)
            optimum = _t_closed_form(n + 1, c + 1) - n if n else 0
            assert plan.num_recomputed == optimum, (n, c)
            assert plan.total_evaluations == 2 * n + optimum
            assert plan.peak_slots_used <= c


# Body evaluations of the last recorded gradient, in execution order.
_calls: list[int] = []


def _record(step):
    _calls.append(int(step))


def _recording_f(carry, x):
    k, h = carry
    jax.debug.callback(_record, k, ordered=True)
    return (k + 1, jnp.sin(h) * x + 0.2 * h), h


@ft.cache
def _recording_grad(n, checkpoints):
    def loss(h, xs):
        (_, h), ys = loopax.scan(
            _recording_f, (jnp.int32(0), h), xs, checkpoints=checkpoints
        )
        return jnp.sum(h) + jnp.sum(ys)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("n, checkpoints", [(5, 1), (33, 3), (60, 6), (6, 8)])
def test_compiled_body_calls_match_replay(n, checkpoints):
    xs = jnp.linspace(0.5, 1.5, n)
    h = jnp.array([0.3, -0.2])
    _calls.clear()
    got = jax.block_until_ready(_recording_grad(n, checkpoints)(h, xs))
    jax.effects_barrier()
    plan = loopax.schedule(n, checkpoints, max_steps=n, known_length=True)
    assert tuple(_calls) == plan.body_calls
    if not plan.stores_residuals:
        assert len(_calls) == n + _t_closed_form(n + 1, checkpoints + 1)

    def ref(h, xs):
        (_, h), ys = lax.scan(_recording_f, (jnp.int32(0), h), xs)
        return jnp.sum(h) + jnp.sum(ys)

    assert_tree_allclose(got, jax.grad(ref, argnums=(0, 1))(h, xs), atol=1e-5)
    jax.effects_barrier()


# -- fori_loop ----------------------------------------------------------------------


def _fori_body(i, val):
    x, y = val
    x = jnp.tanh(W @ x) * (1.0 + 0.1 * i.astype(jnp.float32))
    return x, y + jnp.sum(x)


def _fori_loss(fori_loop, x, lower, upper):
    x, y = fori_loop(lower, upper, _fori_body, (x, jnp.float32(0.0)))
    return jnp.sum(x**2) + y


X0 = jnp.array([0.5, -1.0, 0.2])


@pytest.mark.parametrize("kind", ["lax", "checkpointed", "bounded"])
def test_fori_loop_static_bounds(kind):
    loop = ft.partial(loopax.fori_loop, kind=kind, checkpoints=2)
    want = _fori_loss(lax.fori_loop, X0, 2, 9)
    np.testing.assert_allclose(_fori_loss(loop, X0, 2, 9), want, rtol=1e-6)
    np.testing.assert_allclose(
        _fori_loss(loop, X0, 5, 3), _fori_loss(lax.fori_loop, X0, 5, 3)
    )
    if kind == "lax":
        return
    grad = jax.jit(jax.grad(lambda x: _fori_loss(loop, x, 2, 9)))(X0)
    want_grad = jax.grad(lambda x: _fori_loss(lax.fori_loop, x, 2, 9))(X0)
    assert_tree_allclose(grad, want_grad, atol=1e-5)


@pytest.mark.parametrize(
    "kind, options",
    [("checkpointed", {"checkpoints": 2}), ("bounded", {"max_steps": 12})],
)
def test_fori_loop_traced_bounds_reverse_mode(kind, options):
    loop = ft.partial(loopax.fori_loop, kind=kind, **options)
    grad = jax.jit(jax.value_and_grad(ft.partial(_fori_loss, loop)), static_argnums=())
    for lower, upper in [(0, 0), (1, 7), (3, 12)]:
        lo, up = jnp.int32(lower), jnp.int32(upper)
        got = grad(X0, lo, up)
        want = jax.value_and_grad(ft.partial(_fori_loss, lax.fori_loop))(
            X0, lower, upper
        )
        assert_tree_allclose(got, want, atol=1e-5)
    # `lax.fori_loop` itself cannot do this.
    with pytest.raises(ValueError, match="Reverse-mode differentiation"):
        jax.jit(jax.grad(ft.partial(_fori_loss, lax.fori_loop)))(
            X0, jnp.int32(1), jnp.int32(7)
        )


def test_fori_loop_traced_bounds_forward_and_vmap():
    loop = ft.partial(loopax.fori_loop, kind="lax")
    run = jax.jit(ft.partial(_fori_loss, loop))
    want = _fori_loss(lax.fori_loop, X0, 1, 6)
    np.testing.assert_allclose(run(X0, jnp.int32(1), jnp.int32(6)), want, rtol=1e-6)
    uppers = jnp.array([0, 3, 6], jnp.int32)
    loop = ft.partial(loopax.fori_loop, checkpoints=2)
    got = jax.jit(
        jax.vmap(jax.grad(ft.partial(_fori_loss, loop)), in_axes=(None, None, 0))
    )(X0, jnp.int32(0), uppers)
    want = [
        jax.grad(_fori_loss, argnums=1)(lax.fori_loop, X0, 0, int(u)) for u in uppers
    ]
    assert_tree_allclose(got, jnp.stack(want), atol=1e-5)


# -- errors -------------------------------------------------------------------------


def _identity(c, x):
    return c, x


def test_inconsistent_xs_lengths():
    xs = {"a": jnp.zeros(3), "b": jnp.zeros((4, 2))}
    match = r"same leading length .*\['a'\]: 3, xs\['b'\]: 4"
    with pytest.raises(ValueError, match=match):
        loopax.scan(_identity, 0.0, xs)
    with pytest.raises(ValueError, match=r"`length=5` does not match .* 3"):
        loopax.scan(_identity, 0.0, jnp.zeros(3), length=5)
    with pytest.raises(ValueError, match=r"xs\[0\] is a scalar"):
        loopax.scan(_identity, 0.0, (jnp.float32(1.0),))


def test_missing_length():
    with pytest.raises(ValueError, match="needs `length` when `xs` is None"):
        loopax.scan(_identity, 0.0)
    with pytest.raises(ValueError, match="`length` must be a non-negative integer"):
        loopax.scan(_identity, 0.0, length=-1)
    with pytest.raises(TypeError, match="`length` must be a non-negative integer"):
        loopax.scan(_identity, 0.0, length=2.0)
    with pytest.raises(TypeError, match="`length` must be a static Python int"):
        jax.jit(lambda n: loopax.scan(_identity, 0.0, length=n))(3)


@pytest.mark.parametrize(
    "checkpoints, error",
    [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("some", TypeError)],
)
def test_bad_checkpoints(checkpoints, error):
    match = (
        r"`checkpoints` must be a positive integer or None, got "
        + re_escape(repr(checkpoints))
        + r"\. .*'all' to store every step"
    )
    with pytest.raises(error, match=match):
        loopax.scan(_identity, 0.0, length=3, checkpoints=checkpoints)
    with pytest.raises(error, match=r"`checkpoints` must be a positive integer"):
        loopax.fori_loop(0, 3, lambda i, v: v, 0.0, checkpoints=checkpoints)


def re_escape(s):
    import re

    return re.escape(s)


def test_bad_kind_and_f():
    with pytest.raises(ValueError, match=r"'lax' or 'checkpointed' for `loopax.scan`"):
        loopax.scan(_identity, 0.0, length=3, kind="bounded")  # pyright: ignore
    with pytest.raises(TypeError, match="`f` must be callable"):
        loopax.scan(3, 0.0, length=3)  # pyright: ignore
    with pytest.raises(TypeError, match=r"`f` must return a pair `\(carry, y\)`"):
        loopax.scan(lambda c, x: c, 0.0, length=3)
    with pytest.raises(TypeError, match="`f` must return a carry with the same"):
        loopax.scan(lambda c, x: (c.astype(jnp.int32), x), 0.0, length=3)
    with pytest.raises(TypeError, match="`reverse` must be a bool"):
        loopax.scan(_identity, 0.0, length=3, reverse=1)  # pyright: ignore


def test_fori_loop_errors():
    with pytest.raises(ValueError, match=r"`kind` must be one of"):
        loopax.fori_loop(0, 3, lambda i, v: v, 0.0, kind="scan")  # pyright: ignore
    with pytest.raises(TypeError, match="`body_fun` must be callable"):
        loopax.fori_loop(0, 3, None, 0.0)  # pyright: ignore
    with pytest.raises(ValueError, match="kind='bounded' with traced .* `max_steps`"):
        jax.jit(lambda n: loopax.fori_loop(0, n, lambda i, v: v, 0.0, kind="bounded"))(
            3
        )
    with pytest.raises(TypeError, match="`upper` must be an integer"):
        jax.jit(lambda n: loopax.fori_loop(0, n, lambda i, v: v, 0.0))(3.0)
    # Traced bounds without `checkpoints` or `max_steps`: forward works, reverse
    # mode asks for one of them.
    loss = ft.partial(_fori_loss, ft.partial(loopax.fori_loop))
    jax.jit(loss)(X0, jnp.int32(0), jnp.int32(3))
    with pytest.raises(ValueError, match="pass `checkpoints=`"):
        jax.jit(jax.grad(loss))(X0, jnp.int32(0), jnp.int32(3))


def test_outputs_are_per_step_not_carried():
    """The stacked outputs of a checkpointed scan are per-step outputs of the loop,
    not a buffer in its carry: no loop in the gradient (forward or backward sweep)
    carries an array with a leading dimension of the scan's length, so the backward
    sweep never copies an output-sized cotangent per step."""
    length = 997  # A prime: no other dimension equals it by chance.

    def loss(h):
        _, ys = loopax.scan(
            lambda c, x: (jnp.sin(c), c * 2.0), h, None, length=length, checkpoints=4
        )
        return jnp.sum(ys)

    def carried_shapes(jaxpr):
        shapes = []
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "loopax_checkpointed_loop":
                carry = eqn.invars[eqn.params["spec"].num_consts :]
                shapes += [tuple(v.aval.shape) for v in carry]
        for sub in jex.core.subjaxprs(jaxpr):
            shapes += carried_shapes(sub)
        return shapes

    shapes = carried_shapes(jax.make_jaxpr(jax.grad(loss))(jnp.ones(3)).jaxpr)
    assert shapes, "no checkpointed loop found"
    assert not [s for s in shapes if length in s]
    # And the gradient is right.
    want = jax.grad(
        lambda h: jnp.sum(
            jax.lax.scan(lambda c, x: (jnp.sin(c), c * 2.0), h, None, length=length)[1]
        )
    )(jnp.ones(3))
    np.testing.assert_allclose(jax.grad(loss)(jnp.ones(3)), want, rtol=1e-5)
