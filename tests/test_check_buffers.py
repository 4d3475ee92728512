"""`check_buffers=True`: every planted violation of the buffer contract is caught.

Each violation (second write, read before write, out-of-bounds write, out-of-bounds
read) is planted at step 2 of a loop that is otherwise correct, for every kind, under
`jit` and under `vmap`, and must raise an error naming the buffer and the index. A
correct program gives the same values and gradients with the checks on, and with them
off the traced program is exactly the unchecked one.
"""

import re

import jax
import jax.lax as lax
import jax.numpy as jnp
import pytest
from helpers import KINDS, REVERSE_KINDS, assert_tree_allclose

import loopax


_N = 5
_BAD_STEP = 2

# kind, extra options: the checkpointed kind both with fewer checkpoints than steps
# (recomputation in the backward sweep) and storing every step.
_CONFIGS = [
    pytest.param("lax", {}, id="lax"),
    pytest.param("checkpointed", {"checkpoints": 2}, id="checkpointed"),
    pytest.param("checkpointed", {"checkpoints": _N}, id="checkpointed-store-all"),
    pytest.param("bounded", {"base": 2}, id="bounded"),
]

# violation -> (message pattern, planted write index, planted read index)
_VIOLATIONS = {
    "second-write": (
        r"second write to index 0 of buffer `init_val\['out'\]`",
        0,
        None,
    ),
    "read-before-write": (
        r"read of index 3 of buffer `init_val\['out'\]` before it was written",
        None,
        3,
    ),
    "out-of-bounds-write": (
        r"out-of-bounds write at index 7 of buffer `init_val\['out'\]` of shape "
        r"\(5, 2\)",
        _N + 2,
        None,
    ),
    "out-of-bounds-read": (
        r"out-of-bounds read at index -6 of buffer `init_val\['out'\]` of shape "
        r"\(5, 2\)",
        None,
        -_N - 1,
    ),
}


def _make_body(write_at=None, read_at=None):
    """Step i writes row i of `out`, then reads row i // 2 (written at step i // 2 <=
    i) into `x`. At step `_BAD_STEP`, it writes row `write_at` and reads row
    `read_at` instead, where given."""

    def body(c):
        i, out, x = c["i"], c["out"], c["x"]
        bad = i == _BAD_STEP
        write = i if write_at is None else jnp.where(bad, write_at, i)
        read = i // 2 if read_at is None else jnp.where(bad, read_at, i // 2)
        out = out.at[write].set(jnp.sin(x) * (i + 1).astype(x.dtype))
        x = x + 0.5 * out[read]
        return {"i": i + 1, "n": c["n"], "out": out, "x": x}

    return body


def _run(x, *, body, kind, n=_N, check_buffers=True, **options):
    init = {"i": jnp.array(0), "n": n, "out": jnp.zeros((_N, 2)), "x": x}
    final = loopax.while_loop(
        lambda c: c["i"] < c["n"],
        body,
        init,
        kind=kind,
        max_steps=_N,
        buffers=lambda c: c["out"],
        check_buffers=check_buffers,
        **options,
    )
    return final["out"], final["x"]


def _loss(x, **kwargs):
    out, x = _run(x, **kwargs)
    return jnp.sum(out**2) + jnp.sum(jnp.cos(x))


_X = jnp.array([0.3, -0.7])


# -- planted violations ---------------------------------------------------------------


@pytest.mark.parametrize("violation", list(_VIOLATIONS))
@pytest.mark.parametrize("kind,options", _CONFIGS)
@pytest.mark.parametrize("transform", ["jit", "vmap"])
def test_planted_violation_is_caught(violation, kind, options, transform):
    message, write_at, read_at = _VIOLATIONS[violation]
    body = _make_body(write_at, read_at)
    if transform == "jit":
        fn = jax.jit(lambda x: _run(x, body=body, kind=kind, **options))
        x = _X
    else:
        # Batched stop steps: the element that stops after 4 steps (still active at
        # step 2) commits the violation; the one that stops after 1 step is frozen.
        fn = jax.jit(
            jax.vmap(lambda x, n: _run(x, body=body, kind=kind, n=n, **options))
        )
        x = (jnp.stack([_X, 2 * _X]), jnp.array([4, 1]))
    with pytest.raises(RuntimeError, match=message):
        jax.block_until_ready(fn(*x) if isinstance(x, tuple) else fn(x))


@pytest.mark.parametrize("violation", list(_VIOLATIONS))
@pytest.mark.parametrize("kind,options", [c for c in _CONFIGS if c.id != "lax"])
def test_planted_violation_is_caught_under_grad(violation, kind, options):
    message, write_at, read_at = _VIOLATIONS[violation]
    body = _make_body(write_at, read_at)
    grad = jax.jit(jax.grad(lambda x: _loss(x, body=body, kind=kind, **options)))
    with pytest.raises(RuntimeError, match=message):
        jax.block_until_ready(grad(_X))


def test_violation_in_a_finished_batch_element_is_ignored():
    """A finished element is frozen, and its frozen steps neither write nor count."""
    body = _make_body(write_at=0)  # The second write happens at step 2.
    fn = jax.vmap(lambda x, n: _run(x, body=body, kind="lax", n=n))
    # Both elements finish before step 2: nothing to report.
    out, _ = fn(jnp.stack([_X, _X]), jnp.array([2, 1]))
    assert out.shape == (2, _N, 2)
    # One element reaches step 2.
    with pytest.raises(RuntimeError, match=_VIOLATIONS["second-write"][0]):
        fn(jnp.stack([_X, _X]), jnp.array([2, 3]))


def test_violation_without_jit_is_loopax_error_alone():
    """Called outside any transformation, the loop raises loopax's error itself (not
    JAX's runtime error with a Python stack before the message)."""
    body = _make_body(write_at=0)
    message = _VIOLATIONS["second-write"][0]
    with pytest.raises(loopax.BufferContractError) as info:
        _run(_X, body=body, kind="checkpointed")
    assert re.search(message, str(info.value)), str(info.value)
    assert str(info.value).startswith("loopax check_buffers=True: second write")
    assert not isinstance(info.value, jax.errors.JaxRuntimeError)
    with jax.disable_jit(), pytest.raises(loopax.BufferContractError, match=message):
        _run(_X, body=body, kind="lax")
    with jax.disable_jit():
        good = _run(_X, body=_make_body(), kind="lax")
    assert_tree_allclose(good, _run(_X, body=_make_body(), kind="lax"))


def test_scan_violation_without_jit_is_loopax_error_alone():
    def f(buf, x):
        return buf.at[0].set(x), None

    for kind in ["lax", "checkpointed"]:
        with pytest.raises(loopax.BufferContractError, match="second write"):
            loopax.scan(
                f,
                jnp.zeros(3),
                jnp.arange(2.0),
                kind=kind,
                buffers=lambda c: c,
                check_buffers=True,
            )


def test_concrete_init_with_traced_closure():
    """A concrete `init_val` whose loop closes over a tracer is still traced: correct
    programs run under jit, grad and vmap, and a violation still fails."""

    def run(x, write_at=None):
        def body(c):
            i, buf = c
            return i + 1, buf.at[i if write_at is None else write_at].set(x * i)

        return loopax.while_loop(
            lambda c: c[0] < 3,
            body,
            (0, jnp.zeros(5)),
            buffers=lambda c: c[1],
            check_buffers=True,
            max_steps=5,
        )[1]

    want = jnp.array([0.0, 2.0, 4.0, 0.0, 0.0])
    assert_tree_allclose(jax.jit(run)(2.0), want)
    assert float(jax.grad(lambda x: run(x).sum())(2.0)) == 3.0  # 0 + 1 + 2
    assert_tree_allclose(jax.vmap(run)(jnp.array([2.0, 1.0]))[0], want)
    with pytest.raises(RuntimeError, match="second write to index 0"):
        jax.jit(lambda x: run(x, write_at=0))(2.0)


def test_jit_error_shows_loopax_message_first_and_alone(capfd):
    """Under `jax.jit` JAX's runtime error puts a Python stack before loopax's
    message: loopax writes the message to stderr first, and the error itself ends
    with it and gives no advice of its own (no other transformation to wrap in)."""
    capfd.readouterr()
    with pytest.raises(jax.errors.JaxRuntimeError) as info:
        jax.jit(lambda x: _run(x, body=_make_body(write_at=0), kind="lax"))(_X)
    text = str(info.value)
    last = text.strip().splitlines()[-1]
    assert re.search(_VIOLATIONS["second-write"][0], last), text
    assert last.startswith("BufferContractError: loopax check_buffers=True"), text
    assert "filter_jit" not in text and "EQX_ON_ERROR" not in text, text
    printed = capfd.readouterr().err.strip().splitlines()
    assert printed, "nothing written to stderr"
    assert printed[0].startswith(
        "loopax.BufferContractError: loopax check_buffers=True: second write"
    ), printed
    assert len(printed) == 1, printed


def test_reads_in_cond_fun_are_checked():
    def run():
        return loopax.while_loop(
            lambda c: (c[0] < 3) & (c[1][2] == 0.0),
            lambda c: (c[0] + 1, c[1].at[c[0]].set(1.0)),
            (jnp.array(0), jnp.zeros(3)),
            kind="lax",
            buffers=lambda c: c[1],
            check_buffers=True,
        )

    with pytest.raises(
        RuntimeError, match=r"read of index 2 of buffer `init_val\[1\]`"
    ):
        jax.jit(run)()


# -- correct programs -----------------------------------------------------------------


@pytest.mark.parametrize("kind,options", _CONFIGS)
def test_correct_program_gives_identical_values(kind, options):
    body = _make_body()
    for x, n in [(_X, _N), (_X, 3)]:
        checked = jax.jit(lambda x, n: _run(x, body=body, kind=kind, n=n, **options))(
            x, n
        )
        unchecked = _run(x, body=body, kind=kind, n=n, check_buffers=False, **options)
        assert_tree_allclose(checked, unchecked, rtol=0, atol=0)


@pytest.mark.parametrize("kind,options", [c for c in _CONFIGS if c.id != "lax"])
def test_correct_program_gives_identical_gradients(kind, options):
    """The checkpointed kind recomputes steps in its backward sweep: the masks are
    restored from the checkpoints with the rest of the state, so recomputed writes are
    not mistaken for second writes."""
    body = _make_body()
    checked = jax.jit(jax.grad(lambda x: _loss(x, body=body, kind=kind, **options)))
    unchecked = jax.grad(
        lambda x: _loss(x, body=body, kind=kind, check_buffers=False, **options)
    )
    assert_tree_allclose(checked(_X), unchecked(_X), rtol=0, atol=0)


@pytest.mark.parametrize("kind,options", _CONFIGS)
def test_correct_program_under_vmap_with_batched_stop_steps(kind, options):
    body = _make_body()
    xs, ns = jnp.stack([_X, -_X, 2 * _X]), jnp.array([5, 1, 3])

    def run(check):
        return jax.vmap(
            lambda x, n: _run(
                x, body=body, kind=kind, n=n, check_buffers=check, **options
            )
        )(xs, ns)

    assert_tree_allclose(jax.jit(lambda: run(True))(), run(False), rtol=0, atol=0)
    if kind in REVERSE_KINDS:

        def loss(xs, check):
            return jnp.sum(
                jax.vmap(
                    lambda x, n: _loss(
                        x, body=body, kind=kind, n=n, check_buffers=check, **options
                    )
                )(xs, ns)
            )

        assert_tree_allclose(
            jax.jit(jax.grad(lambda xs: loss(xs, True)))(xs),
            jax.grad(lambda xs: loss(xs, False))(xs),
            rtol=0,
            atol=0,
        )


def test_element_wise_writes_and_explicit_mode():
    """The mask has the buffer's shape: writing different entries of one row at
    different steps is fine; with an explicit `mode=` out-of-bounds writes and reads
    follow that mode and are not reported."""

    def body(c):
        i, out = c
        out = out.at[i // 2, i % 2].set(i.astype(out.dtype))
        out = out.at[_N + 10].set(1.0, mode="drop")
        _ = out.at[-_N - 10].get(mode="fill", fill_value=0.0)
        return i + 1, out

    out = loopax.while_loop(
        lambda c: c[0] < 2 * _N,
        body,
        (jnp.array(0), jnp.zeros((_N, 2))),
        kind="lax",
        buffers=lambda c: c[1],
        check_buffers=True,
    )[1]
    assert_tree_allclose(out, jnp.arange(2.0 * _N).reshape(_N, 2))


def test_masked_write_with_pred_does_not_count():
    def body(c):
        i, out = c
        # Writes row 0 only at step 1; the other steps' writes to row 0 are masked off.
        out = out.at[0].set(1.0, pred=i == 1)
        return i + 1, out

    out = loopax.while_loop(
        lambda c: c[0] < 3,
        body,
        (jnp.array(0), jnp.zeros(2)),
        kind="lax",
        buffers=lambda c: c[1],
        check_buffers=True,
    )[1]
    assert_tree_allclose(out, jnp.array([1.0, 0.0]))


# -- scan, fori_loop, nested loops ----------------------------------------------------


def _double_write_step(carry, x):
    i, out = carry
    out = out.at[jnp.minimum(i, 1)].set(x)  # Steps 1 and 2 both write row 1.
    return (i + 1, out), x


@pytest.mark.parametrize("kind", ["lax", "checkpointed"])
def test_scan(kind):
    init = (jnp.array(0), {"out": jnp.zeros(4)})
    xs = jnp.arange(3.0)

    def step(carry, x):
        i, out = carry
        out["out"] = out["out"].at[jnp.minimum(i, 1)].set(x)
        return (i + 1, out), x

    def run(step):
        return loopax.scan(
            step,
            init,
            xs,
            kind=kind,
            buffers=lambda c: c[1]["out"],
            check_buffers=True,
        )

    with pytest.raises(RuntimeError, match=r"second write to index 1 of buffer `init"):
        jax.jit(lambda: run(step))()
    # The message names the buffer by its path in `init`.
    with pytest.raises(RuntimeError, match=re.escape("`init[1]['out']`")):
        jax.jit(lambda: run(step))()

    def good(carry, x):
        i, out = carry
        out["out"] = out["out"].at[i].set(x)
        return (i + 1, out), x * out["out"][i]

    checked = jax.jit(lambda: run(good))()
    unchecked = loopax.scan(good, init, xs, kind=kind, buffers=lambda c: c[1]["out"])
    assert_tree_allclose(checked, unchecked, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("static", [True, False])
def test_fori_loop(kind, static):
    def body(i, val):
        return {"out": val["out"].at[jnp.minimum(i, 1)].set(1.0)}

    def run(upper):
        return loopax.fori_loop(
            0,
            upper,
            body,
            {"out": jnp.zeros(4)},
            kind=kind,
            max_steps=4,
            buffers=lambda v: v["out"],
            check_buffers=True,
        )

    match = r"second write to index 1 of buffer `init_val\['out'\]`"
    with pytest.raises(RuntimeError, match=match):
        if static:
            jax.jit(lambda: run(3))()
        else:
            jax.jit(run)(3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inner_check", [False, True])
def test_outer_buffer_is_checked_in_an_inner_loop(kind, inner_check):
    """An outer loop's checked buffer keeps its mask through an inner loop, whatever
    the inner loop's own setting: a write there to a row the outer loop already wrote
    is a second write."""

    def outer_body(c, inner_row):
        i, out = c

        def inner_body(d):
            j, out = d
            return j + 1, out.at[inner_row(i)].set(1.0)

        _, out = loopax.while_loop(
            lambda d: d[0] < 1,
            inner_body,
            (jnp.array(0), out),
            kind=kind,
            max_steps=1,
            buffers=lambda d: d[1],
            check_buffers=inner_check,
        )
        return i + 1, out

    def run(inner_row):
        return loopax.while_loop(
            lambda c: c[0] < 3,
            lambda c: outer_body(c, inner_row),
            (jnp.array(0), jnp.zeros(3)),
            kind=kind,
            max_steps=3,
            buffers=lambda c: c[1],
            check_buffers=True,
        )[1]

    assert_tree_allclose(jax.jit(lambda: run(lambda i: i))(), jnp.ones(3))
    with pytest.raises(
        RuntimeError, match=r"second write to index 0 of buffer `init_val\[1\]`"
    ):
        jax.jit(lambda: run(lambda i: i // 2))()


# -- off by default, at no cost -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_off_adds_nothing_to_the_program(kind):
    body = _make_body()

    def run(x, **kwargs):
        init = {"i": jnp.array(0), "n": _N, "out": jnp.zeros((_N, 2)), "x": x}
        return loopax.while_loop(
            lambda c: c["i"] < c["n"],
            body,
            init,
            kind=kind,
            max_steps=_N,
            buffers=lambda c: c["out"],
            **kwargs,
        )

    default = str(jax.make_jaxpr(run)(_X))
    off = str(jax.make_jaxpr(lambda x: run(x, check_buffers=False))(_X))
    on = str(jax.make_jaxpr(lambda x: run(x, check_buffers=True))(_X))
    assert off == default
    assert "debug_callback" not in off
    assert "debug_callback" in on
    if kind in REVERSE_KINDS:
        grad_default = str(jax.make_jaxpr(jax.grad(lambda x: run(x)["x"].sum()))(_X))
        grad_off = str(
            jax.make_jaxpr(jax.grad(lambda x: run(x, check_buffers=False)["x"].sum()))(
                _X
            )
        )
        assert grad_off == grad_default
        assert "pure_callback" not in grad_off


def test_unchecked_loop_has_the_unchecked_carry():
    """With checks off the carry holds no masks: what lax.while_loop runs is the
    user's carry and the step counter."""
    jaxpr = jax.make_jaxpr(
        lambda x: loopax.while_loop(
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1, c[1].at[c[0]].set(1.0)),
            (jnp.array(0), x),
            kind="lax",
            buffers=lambda c: c[1],
        )
    )(jnp.zeros(3))
    (eqn,) = [e for e in jaxpr.jaxpr.eqns if e.primitive is lax.while_p]
    assert [str(v.aval) for v in eqn.outvars] == ["int32[]", "int32[]", "float32[3]"]


@pytest.mark.parametrize("value", [1, 0, None, "yes", jnp.array(True)])
def test_check_buffers_must_be_a_bool(value):
    match = rf"`check_buffers` must be a bool, got {re.escape(repr(value))}\. Pass"
    with pytest.raises(TypeError, match=match):
        loopax.while_loop(
            lambda c: c < 3, lambda c: c + 1, jnp.array(0), check_buffers=value
        )
    with pytest.raises(TypeError, match=match):
        loopax.scan(lambda c, x: (c, x), 0.0, jnp.zeros(2), check_buffers=value)
    with pytest.raises(TypeError, match=match):
        loopax.fori_loop(0, 2, lambda i, v: v, 0.0, check_buffers=value)


def test_forward_mode_and_hessian_are_unchanged():
    """The checkpointed kind also supports jvp and hessian: the same with checks."""
    body = _make_body()

    def f(x, check):
        return _loss(
            x, body=body, kind="checkpointed", checkpoints=2, check_buffers=check
        )

    tangent = jnp.ones(2)
    assert_tree_allclose(
        jax.jvp(lambda x: f(x, True), (_X,), (tangent,)),
        jax.jvp(lambda x: f(x, False), (_X,), (tangent,)),
        rtol=0,
        atol=0,
    )
    assert_tree_allclose(
        jax.hessian(lambda x: f(x, True))(_X),
        jax.hessian(lambda x: f(x, False))(_X),
        rtol=0,
        atol=0,
    )
