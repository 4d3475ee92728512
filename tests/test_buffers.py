"""`loopax.Buffer`, `loopax.buffer_at_set` and `buffers=` in loops (also nested)."""

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KINDS, assert_tree_allclose, loop_kwargs, scan_reference_loop

import loopax


# -- Buffer on its own ----------------------------------------------------------------


def test_buffer_indexing_and_attributes():
    array = jnp.arange(12.0).reshape(3, 4)
    buf = loopax.Buffer(array)
    assert buf.shape == (3, 4)
    assert buf.dtype == jnp.float32
    assert buf.ndim == 2
    assert buf.size == 12
    np.testing.assert_array_equal(buf[1], array[1])
    np.testing.assert_array_equal(buf[1, 2:], array[1, 2:])
    np.testing.assert_array_equal(buf.at[2].get(), array[2])
    np.testing.assert_array_equal(buf.at[0, 1].get(), array[0, 1])


def test_buffer_set_returns_buffer():
    buf = loopax.Buffer(jnp.zeros((3, 2)))
    new = buf.at[1].set(jnp.array([1.0, 2.0]))
    assert isinstance(new, loopax.Buffer)
    np.testing.assert_array_equal(new[1], [1.0, 2.0])
    np.testing.assert_array_equal(new[0], [0.0, 0.0])
    np.testing.assert_array_equal(buf[1], [0.0, 0.0])  # functional update


@pytest.mark.parametrize("pred", [True, False, jnp.array(True), jnp.array(False)])
def test_buffer_masked_set(pred):
    buf = loopax.Buffer(jnp.zeros((3, 2)))
    new = buf.at[2].set(jnp.array([5.0, 6.0]), pred=pred)
    expected = [5.0, 6.0] if bool(pred) else [0.0, 0.0]
    np.testing.assert_array_equal(new[2], expected)
    np.testing.assert_array_equal(new[:2], jnp.zeros((2, 2)))


def test_buffer_masked_set_traced_pred():
    @jax.jit
    def write(array, pred):
        return loopax.Buffer(array).at[0].set(1.0, pred=pred)

    np.testing.assert_array_equal(write(jnp.zeros(2), True)[0], 1.0)
    np.testing.assert_array_equal(write(jnp.zeros(2), False)[0], 0.0)


def test_buffer_batched_pred_masks_per_element():
    def write(array, pred):
        return loopax.Buffer(array).at[1].set(7.0, pred=pred)._array

    arrays = jnp.zeros((4, 3))
    preds = jnp.array([True, False, True, False])
    out = jax.vmap(write)(arrays, preds)
    np.testing.assert_array_equal(out[:, 1], [7.0, 0.0, 7.0, 0.0])
    np.testing.assert_array_equal(out[:, 0], 0.0)
    # Unbatched array, batched predicate.
    out = jax.vmap(write, in_axes=(None, 0))(jnp.zeros(3), preds)
    np.testing.assert_array_equal(out[:, 1], [7.0, 0.0, 7.0, 0.0])


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("pred", [True, False, jnp.array(True), jnp.array(False)])
def test_buffer_at_set_arrays_and_buffers(wrap, pred):
    array = jnp.arange(6.0).reshape(3, 2)
    buf = loopax.Buffer(array) if wrap else array
    out = loopax.buffer_at_set(buf, 1, jnp.array([-1.0, -2.0]), pred=pred)
    assert isinstance(out, loopax.Buffer) == wrap
    out = out._array if wrap else out
    expected = array.at[1].set(jnp.array([-1.0, -2.0])) if bool(pred) else array
    np.testing.assert_array_equal(out, expected)


def test_buffer_at_set_batched_pred_on_array():
    preds = jnp.array([True, False])
    out = jax.vmap(lambda p: loopax.buffer_at_set(jnp.zeros(3), 0, 1.0, pred=p))(preds)
    np.testing.assert_array_equal(out, [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_buffer_at_set_kwargs():
    out = loopax.buffer_at_set(jnp.zeros(3), 5, 1.0, mode="drop")
    np.testing.assert_array_equal(out, jnp.zeros(3))


def test_equinox_buffer_at_set_on_loopax_buffer():
    buf = loopax.Buffer(jnp.zeros(3))
    out = eqxi.buffer_at_set(buf, 1, 2.0, pred=jnp.array(True))
    assert isinstance(out, loopax.Buffer)
    np.testing.assert_array_equal(out._array, [0.0, 2.0, 0.0])
    out = eqxi.buffer_at_set(buf, 1, 2.0, pred=jnp.array(False))
    np.testing.assert_array_equal(out._array, [0.0, 0.0, 0.0])


# -- buffers in loops -----------------------------------------------------------------

_N = 5


def _row_cond(c):
    return c[0] < _N


def _row_body(c):
    """Writes row i of `c[1]`, with the same code for arrays and `Buffer`s."""
    i, buf, x = c
    buf = loopax.buffer_at_set(buf, i, x * i.astype(x.dtype))
    return i + 1, buf, x + 1.0


def _row_init():
    return jnp.array(0), jnp.zeros((_N, 3)), jnp.arange(3.0)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_loop_writes_rows(kind, jit):
    seen = []

    def body(c):
        seen.append(tuple(type(x) for x in c))
        return _row_body(c)

    def run(init):
        return loopax.while_loop(
            _row_cond, body, init, buffers=lambda c: c[1], **loop_kwargs(kind)
        )

    out = jax.jit(run)(_row_init()) if jit else run(_row_init())
    expected = lax.while_loop(_row_cond, _row_body, _row_init())
    assert_tree_allclose(out, expected)
    assert not isinstance(out[1], loopax.Buffer)  # unwrapped on the way out
    # Inside the body, only the selected leaf is a Buffer.
    assert seen and all(types[1] is loopax.Buffer for types in seen)
    assert all(types[0] is not loopax.Buffer for types in seen)
    assert all(types[2] is not loopax.Buffer for types in seen)


@pytest.mark.parametrize("kind", KINDS)
def test_loop_writes_rows_disable_jit(kind):
    with jax.disable_jit():
        out = loopax.while_loop(
            _row_cond,
            _row_body,
            _row_init(),
            buffers=lambda c: c[1],
            **loop_kwargs(kind),
        )
    assert_tree_allclose(out, lax.while_loop(_row_cond, _row_body, _row_init()))


def _two_buffer_body(c):
    i, bufs, x = c
    a, b = bufs["a"], bufs["b"]
    a = a.at[i].set(x)
    b = loopax.buffer_at_set(b, i, i, pred=i % 2 == 0)  # masked write
    return i + 1, {"a": a, "b": b}, x * 2.0


def _two_buffer_init():
    bufs = {"a": jnp.zeros((_N,)), "b": jnp.full((_N,), -1, jnp.int32)}
    return jnp.array(0), bufs, jnp.array(1.0)


@pytest.mark.parametrize(
    "buffers",
    [
        pytest.param(lambda c: c[1], id="node"),
        pytest.param(lambda c: (c[1]["a"], c[1]["b"]), id="sequence"),
        pytest.param(lambda c: [c[1]["a"], None, c[1]["b"]], id="sequence-with-None"),
        pytest.param(lambda c: [None, c[1]["b"]], id="one-of-two"),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_buffers_selection_forms(kind, buffers):
    selected = buffers(_two_buffer_init())
    want_b_only = isinstance(selected, list) and selected[0] is None
    seen = []

    def body(c):
        seen.append((type(c[1]["a"]), type(c[1]["b"])))
        return _two_buffer_body(c)

    out = loopax.while_loop(
        _row_cond, body, _two_buffer_init(), buffers=buffers, **loop_kwargs(kind)
    )
    expected = lax.while_loop(_row_cond, _two_buffer_body, _two_buffer_init())
    assert_tree_allclose(out, expected)
    np.testing.assert_array_equal(out[1]["b"], [0, -1, 2, -1, 4])
    assert seen and all(
        (ta is loopax.Buffer) != want_b_only and tb is loopax.Buffer for ta, tb in seen
    )


@pytest.mark.parametrize("kind", KINDS)
def test_buffer_under_vmap_with_batched_pred(kind):
    # Each element writes only the rows before its own `limit`; the loop also stops
    # at a batched step.
    def body(c):
        i, limit, buf = c
        buf = buf.at[i].set(jnp.full(2, i + 1), pred=i < limit)
        return i + 1, limit, buf

    def run(limit, stop):
        init = (jnp.array(0), limit, jnp.zeros((_N, 2), jnp.int32))
        return loopax.while_loop(
            lambda c: c[0] < stop,
            body,
            init,
            buffers=lambda c: c[2],
            **loop_kwargs(kind),
        )

    limits = jnp.array([0, 2, 5, 3])
    stops = jnp.array([5, 1, 4, 5])
    out = jax.jit(jax.vmap(run))(limits, stops)
    for b in range(4):
        n = min(int(limits[b]), int(stops[b]))
        expected = np.zeros((_N, 2), np.int32)
        expected[:n] = np.arange(1, n + 1)[:, None]
        np.testing.assert_array_equal(out[2][b], expected)
    np.testing.assert_array_equal(out[0], stops)


@pytest.mark.parametrize("kind", KINDS)
def test_buffer_under_vmap_unbatched_pred(kind):
    def run(x):
        init = (jnp.array(0), jnp.zeros((_N, 3)), x)
        return loopax.while_loop(
            _row_cond, _row_body, init, buffers=lambda c: c[1], **loop_kwargs(kind)
        )

    xs = jnp.arange(6.0).reshape(2, 3)
    out = jax.vmap(run)(xs)
    expected = jax.vmap(
        lambda x: lax.while_loop(
            _row_cond, _row_body, (jnp.array(0), jnp.zeros((_N, 3)), x)
        )
    )(xs)
    assert_tree_allclose(out, expected)


def test_equinox_buffer_at_set_in_loop_body():
    def body(c):
        i, buf = c
        return i + 1, eqxi.buffer_at_set(buf, i, 2.0 * i, pred=i != 2)

    out = loopax.while_loop(
        lambda c: c[0] < 4,
        body,
        (jnp.array(0), jnp.zeros(4)),
        kind="lax",
        buffers=lambda c: c[1],
    )
    np.testing.assert_array_equal(out[1], [0.0, 2.0, 0.0, 6.0])


# -- nested loops ----------------------------------------------------------------------

_ROWS, _COLS = 3, 4


def _inner_body(c):
    j, i, buf = c
    value = (10 * i + j).astype(jnp.float32)
    return j + 1, i, loopax.buffer_at_set(buf, (i, j), value)


def _outer_body_with(inner_loop):
    def outer_body(c):
        i, buf = c
        _, _, buf = inner_loop(
            lambda d: d[0] < _COLS, _inner_body, (jnp.array(0), i, buf)
        )
        return i + 1, buf

    return outer_body


def _outer_cond(c):
    return c[0] < _ROWS


def _nested_expected():
    return np.array(
        [[10 * i + j for j in range(_COLS)] for i in range(_ROWS)], np.float32
    )


@pytest.mark.parametrize("inner_kind", KINDS)
@pytest.mark.parametrize("outer_kind", KINDS)
def test_nested_outer_buffer_as_inner_buffer(outer_kind, inner_kind):
    inner_seen = []

    def inner_loop(cond, body, init):
        inner_seen.append(type(init[2]))
        return loopax.while_loop(
            cond, body, init, buffers=lambda d: d[2], **loop_kwargs(inner_kind)
        )

    out = jax.jit(
        lambda init: loopax.while_loop(
            _outer_cond,
            _outer_body_with(inner_loop),
            init,
            buffers=lambda c: c[1],
            **loop_kwargs(outer_kind),
        )
    )((jnp.array(0), jnp.zeros((_ROWS, _COLS))))
    assert inner_seen and all(t is loopax.Buffer for t in inner_seen)
    np.testing.assert_array_equal(out[1], _nested_expected())
    reference = lax.while_loop(
        _outer_cond,
        _outer_body_with(lax.while_loop),
        (jnp.array(0), jnp.zeros((_ROWS, _COLS))),
    )
    assert_tree_allclose(out, reference)


@pytest.mark.parametrize("kind", KINDS)
def test_nested_outer_buffer_as_inner_non_buffer_leaf(kind):
    inner_body_types = []

    def inner_body(c):
        inner_body_types.append(type(c[2]))
        j, i, buf = c
        # Read the previous row (written by an earlier outer step), write this one.
        prev = jnp.where(i > 0, buf[jnp.maximum(i - 1, 0), j], 0.0)
        return j + 1, i, buf.at[i, j].set(prev + 1.0)

    def outer_body(c):
        i, buf = c
        _, _, buf = loopax.while_loop(
            lambda d: d[0] < _COLS,
            inner_body,
            (jnp.array(0), i, buf),
            **loop_kwargs(kind),  # no `buffers=`: the outer Buffer is a plain leaf
        )
        assert isinstance(buf, loopax.Buffer)  # handed back as the outer's Buffer
        return i + 1, buf

    out = loopax.while_loop(
        _outer_cond,
        outer_body,
        (jnp.array(0), jnp.zeros((_ROWS, _COLS))),
        buffers=lambda c: c[1],
        **loop_kwargs(kind),
    )
    assert inner_body_types and all(t is loopax.Buffer for t in inner_body_types)
    expected = np.repeat(np.arange(1.0, _ROWS + 1)[:, None], _COLS, axis=1)
    np.testing.assert_array_equal(out[1], expected)


@pytest.mark.parametrize("inner_kind", ["lax", "bounded"])
@pytest.mark.parametrize("outer_kind", ["lax", "checkpointed"])
def test_nested_buffers_under_vmap_with_batched_predicates(outer_kind, inner_kind):
    # Both loops stop at batched steps: an outer element that finished must not be
    # written by the inner loop, nor an inner element after it finished.
    def run(rows, cols, inner_loop, outer_loop):
        def outer_body(c):
            i, buf = c
            _, _, buf = inner_loop(
                lambda d: d[0] < cols, _inner_body, (jnp.array(0), i, buf)
            )
            return i + 1, buf

        return outer_loop(
            lambda c: c[0] < rows, outer_body, (jnp.array(0), jnp.zeros((3, 4)))
        )[1]

    def inner_loop(cond, body, init):
        return loopax.while_loop(
            cond, body, init, buffers=lambda d: d[2], **loop_kwargs(inner_kind)
        )

    def outer_loop(cond, body, init):
        return loopax.while_loop(
            cond, body, init, buffers=lambda c: c[1], **loop_kwargs(outer_kind)
        )

    rows, cols = jnp.array([3, 1, 0, 2]), jnp.array([2, 4, 3, 0])
    out = jax.jit(jax.vmap(lambda r, c: run(r, c, inner_loop, outer_loop)))(rows, cols)
    for b in range(4):
        expected = run(rows[b], cols[b], lax.while_loop, lax.while_loop)
        np.testing.assert_array_equal(out[b], expected)


@pytest.mark.parametrize("kind", ["lax", "checkpointed"])
@pytest.mark.parametrize("batched_stop", [False, True])
def test_buffer_writes_are_in_place_under_vmap(kind, batched_stop):
    # No buffer-sized `select` or `copy` in the compiled loop: finished elements are
    # frozen by masking each write, not by selecting the whole buffer every step.
    # (`lax.while_loop` itself does select the whole carry under a batched predicate.)
    def run(stop, buf):
        stop = stop if batched_stop else 37
        return loopax.while_loop(
            lambda c: c[0] < stop,
            lambda c: (c[0] + 1, c[1].at[c[0]].set(c[0].astype(jnp.float32))),
            (jnp.array(0), buf),
            kind=kind,
            buffers=lambda c: c[1],
        )[1]

    fn = jax.jit(jax.vmap(run), donate_argnums=1)
    hlo = fn.lower(jnp.array([3, 5, 37, 0]), jnp.zeros((4, 37, 7))).compile()
    big = [line for line in hlo.as_text().splitlines() if "f32[4,37,7]" in line]
    assert big
    assert not [line for line in big if " select(" in line or " copy(" in line]


# -- gradients through buffer writes ---------------------------------------------------

_FILL_STEPS, _FILL_ROWS = 7, 16


def _fill_body(c):
    """Writes row 2 i (half the rows stay as they were) and reads it back."""
    i, h, buf = c
    buf = loopax.buffer_at_set(buf, 2 * i, jnp.sin(h) * h)
    return i + 1, jnp.cos(h) + 0.1 * buf[2 * i], buf


def _fill_loss(loop, h0, buf0):
    init = (jnp.array(0), h0, buf0)
    _, h, buf = loop(lambda c: c[0] < _FILL_STEPS, _fill_body, init)
    weights = jnp.arange(1.0, 1.0 + buf.size).reshape(buf.shape) / buf.size
    return jnp.sum(h**2) + jnp.sum(buf * weights)


_FILL_LOOPS = {
    "checkpointed": dict(kind="checkpointed", checkpoints=2),
    "checkpointed_max_steps": dict(kind="checkpointed", checkpoints=3, max_steps=10),
    "store_all": dict(kind="checkpointed", checkpoints=10, max_steps=10),
    "bounded": dict(kind="bounded", max_steps=10, base=2),
}


@pytest.mark.parametrize("loop", _FILL_LOOPS)
@pytest.mark.parametrize("wrt_buffer", [False, True])
def test_grad_through_buffer_writes(loop, wrt_buffer):
    """Gradients with respect to the initial state and, when asked, the initial
    buffer (whose overwritten rows get no cotangent), against the full-storage
    `lax.scan` reference; also under `vmap`."""

    def run(cond, body, init):
        return loopax.while_loop(
            cond, body, init, buffers=lambda c: c[2], **_FILL_LOOPS[loop]
        )

    def reference(cond, body, init):
        return scan_reference_loop(cond, body, init, 10)

    h0 = jnp.linspace(0.2, 0.9, 3)
    buf0 = jnp.linspace(-1.0, 1.0, _FILL_ROWS * 3).reshape(_FILL_ROWS, 3)
    argnums = (0, 1) if wrt_buffer else 0
    got = jax.jit(jax.grad(lambda h, b: _fill_loss(run, h, b), argnums))(h0, buf0)
    want = jax.grad(lambda h, b: _fill_loss(reference, h, b), argnums)(h0, buf0)
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)
    if wrt_buffer:  # The rows the loop overwrote: nothing of `buf0` reaches them.
        assert np.all(np.asarray(got[1])[0 : 2 * _FILL_STEPS : 2] == 0)
    batch = jnp.stack([h0, 0.5 * h0])
    got = jax.jit(jax.vmap(jax.grad(lambda h: _fill_loss(run, h, buf0))))(batch)
    want = jax.vmap(jax.grad(lambda h: _fill_loss(reference, h, buf0)))(batch)
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrt_buffer", [False, True])
def test_buffer_cotangent_not_copied_per_step(wrt_buffer):
    """In the backward sweep, a write's transpose leaves the written row of the
    buffer's cotangent alone (by the contract it is read by no later step), so XLA
    updates the cotangent in place instead of copying it every step. Positive
    control: when the cotangent of the initial buffer is asked for, the row is zeroed
    (exactly) and the copies come back."""
    rows = 997  # A prime: no other array in the program has this dimension.

    def loss(h, buf0):
        def body(c):
            i, h, buf = c
            return i + 1, jnp.tanh(h), buf.at[i].set(h)

        _, h, buf = loopax.while_loop(
            lambda c: c[0] < rows,
            body,
            (0, h, buf0),
            buffers=lambda c: c[2],
            max_steps=rows,
            checkpoints=4,
        )
        return jnp.sum(buf**2) + jnp.sum(h)

    argnums = (0, 1) if wrt_buffer else 0
    grad = jax.jit(jax.grad(loss, argnums))
    hlo = grad.lower(jnp.ones(3), jnp.zeros((rows, 3))).compile().as_text()
    # Copies inside loop bodies (the entry computation may copy the input once).
    in_loops, computation = [], ""
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            computation = line
        elif f"f32[{rows},3]{{1,0}} copy(" in line and not computation.startswith(
            "ENTRY"
        ):
            in_loops.append(line)
    assert bool(in_loops) == wrt_buffer


def _body_with_local_writes(write, inner_loop):
    """Writes into arrays made from the state inside the body (directly and in a
    nested loop): their overwritten entries must get no cotangent."""

    def inner_body(d):
        j, local, h = d
        return j + 1, write(local, j, 2.0 * h), h

    def body(c):
        i, h, buf = c
        local = write(jnp.tile(h, (4, 1)), 1, jnp.sin(h))
        nested = inner_loop(lambda d: d[0] < 3, inner_body, (0, jnp.tile(h, (5, 1)), h))
        h = jnp.cos(h) + 0.1 * local.sum(0) + 0.05 * nested[1].sum(0)
        return i + 1, h, write(buf, i, h)

    return body


@pytest.mark.parametrize("inner_kind", ["checkpointed", "bounded", "lax.fori"])
def test_grad_with_writes_into_arrays_made_in_the_body(inner_kind):
    def inner_loop(cond, body, init):
        if inner_kind == "lax.fori":
            return lax.fori_loop(0, 3, lambda _, d: body(d), init)
        return loopax.while_loop(
            cond, body, init, buffers=lambda d: d[1], kind=inner_kind, max_steps=3
        )

    def loss(h0, body, outer_loop):
        _, h, buf = outer_loop(lambda c: c[0] < 5, body, (0, h0, jnp.zeros((6, 3))))
        return jnp.sum(h**2) + jnp.sum(buf * jnp.arange(18.0).reshape(6, 3))

    body = _body_with_local_writes(loopax.buffer_at_set, inner_loop)
    ref_body = _body_with_local_writes(
        lambda a, i, x: a.at[i].set(x),
        lambda c, b, init: lax.fori_loop(0, 3, lambda _, d: b(d), init),
    )

    def outer(cond, body, init):
        return loopax.while_loop(
            cond, body, init, buffers=lambda c: c[2], checkpoints=2, max_steps=6
        )

    h0 = jnp.array([0.3, -0.4, 0.8])
    got = jax.jit(jax.grad(lambda h: loss(h, body, outer)))(h0)
    want = jax.grad(
        lambda h: loss(h, ref_body, lambda c, b, i: scan_reference_loop(c, b, i, 6))
    )(h0)
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "item",
    [2, -1, 7, (1, 2), np.int32(1), "traced", slice(1, 3), (Ellipsis, 0), "array"],
)
def test_buffer_at_set_matches_jax_forward_and_gradients(item):
    """Every index form: same values and the exact gradient as `.at[item].set`
    (integer scalars take loopax's own write primitive, the rest JAX's scatter; an
    out-of-range index writes nothing)."""
    array = jnp.arange(12.0).reshape(4, 3)
    special = {"traced": jnp.array(3), "array": jnp.array([0, 2])}
    index = special[item] if isinstance(item, str) else item
    x = jnp.full(array.at[index].get(mode="fill", fill_value=0).shape, 0.5)

    def ours(a, v):
        return jnp.sum(jnp.sin(loopax.buffer_at_set(a, index, v * 2.0)) * a)

    def jaxs(a, v):
        return jnp.sum(jnp.sin(a.at[index].set(v * 2.0)) * a)

    assert_tree_allclose(ours(array, x), jaxs(array, x))
    assert_tree_allclose(
        jax.jit(jax.grad(ours, (0, 1)))(array, x), jax.grad(jaxs, (0, 1))(array, x)
    )
    assert_tree_allclose(
        jax.jvp(ours, (array, x), (array, x)), jax.jvp(jaxs, (array, x), (array, x))
    )


# -- `buffers=` selecting the wrong leaf ----------------------------------------------

_NOT_AN_ARRAY = r"`buffers=` selected `{}` as a buffer, so inside the loop it is a `loopax.Buffer`, which cannot be used in {}"

# How a body might use its buffer `c[1]` as an ordinary array, and the operation the
# error names.
_MISUSES = {
    "compare": (lambda b: b < 1.0, r"a comparison \(`<`\)"),
    "equal": (lambda b: b == 1.0, r"a comparison \(`==`\)"),
    "arithmetic": (lambda b: b * 2.0, r"arithmetic \(`\*`\)"),
    "reflected": (lambda b: 1.0 + b, r"arithmetic \(`\+`\)"),
    "matmul": (lambda b: b @ jnp.ones(3), r"a matrix product"),
    "jnp-function": (lambda b: jnp.sin(b), r"a `jax.numpy` function"),
    "jnp-asarray": (lambda b: jnp.asarray(b), r"a `jax.numpy` function"),
    "np-asarray": (lambda b: np.asarray(b), r"a conversion to a NumPy array"),
    "jax-array": (
        lambda b: b.__jax_array__(),
        r"a `jax.numpy` function or a conversion",
    ),
    "bool": (lambda b: bool(b), r"a truth test"),
    "float": (lambda b: float(b), r"`float\(\.\.\.\)`"),
    "iterate": (lambda b: list(b), r"iteration"),
}


@pytest.mark.parametrize("misuse", sorted(_MISUSES))
def test_buffer_used_as_an_array_names_buffers_and_the_leaf(misuse):
    use, operation = _MISUSES[misuse]

    def body(c):
        use(c[1])
        return c[0] + 1, c[1]

    with pytest.raises(
        TypeError, match=_NOT_AN_ARRAY.format(r"init_val\[1\]", operation)
    ):
        loopax.while_loop(
            lambda c: c[0] < 3,
            body,
            (jnp.array(0), jnp.zeros(3)),
            buffers=lambda c: c[1],
            max_steps=3,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_selecting_the_state_fails_in_the_body_with_the_fix(kind):
    """The reported case: the whole state selected, then used in `jnp.sin`."""
    match = _NOT_AN_ARRAY.format(r"init_val\['y'\]", "a `jax.numpy` function")
    with pytest.raises(TypeError, match=match) as info:
        jax.jit(
            lambda y: loopax.while_loop(
                lambda c: c["t"] < 3,
                lambda c: {"t": c["t"] + 1, "y": jnp.sin(c["y"])},
                {"t": jnp.array(0), "y": y},
                buffers=lambda c: c["y"],
                **loop_kwargs(kind, max_steps=3),
            )
        )(jnp.ones(2))
    assert "do not select it in `buffers=`" in str(info.value)


def test_buffer_used_as_an_array_in_cond_fun_and_in_scan_and_fori_loop():
    with pytest.raises(
        TypeError, match=_NOT_AN_ARRAY.format(r"init_val\[1\]", "a comparison")
    ):
        loopax.while_loop(
            lambda c: c[1] < 3,
            lambda c: (c[0] + 1, c[1]),
            (jnp.array(0), jnp.zeros(3)),
            buffers=lambda c: c[1],
            max_steps=3,
        )
    with pytest.raises(
        TypeError, match=_NOT_AN_ARRAY.format(r"init\[1\]", "arithmetic")
    ):
        loopax.scan(
            lambda c, x: ((c[0] + x, c[1] + x), x),
            (jnp.array(0.0), jnp.zeros(3)),
            jnp.ones(3),
            buffers=lambda c: c[1],
        )
    with pytest.raises(
        TypeError, match=_NOT_AN_ARRAY.format(r"init_val\['ys'\]", "arithmetic")
    ):
        loopax.fori_loop(
            0,
            3,
            lambda i, c: {"ys": c["ys"] - 1.0},
            {"ys": jnp.zeros(3)},
            buffers=lambda c: c["ys"],
        )


_SCALAR = r"`buffers=` selected `{}`, a scalar \({}\), but a buffer must have at least one axis"


@pytest.mark.parametrize(
    "scalar,description",
    [
        (jnp.array(0), r"int32\[\]"),
        (jnp.array(True), r"bool\[\]"),
        (jnp.array(0.5), r"float32\[\]"),
    ],
)
def test_scalar_buffer_is_rejected_when_traced(scalar, description):
    """The reported case: the counter selected as a buffer. Rejected before
    `cond_fun` runs (it would fail there on `c[0] < 3`), and any 0-d leaf with it."""
    calls = []

    def cond_fun(c):
        calls.append(1)
        return jnp.array(True)

    with pytest.raises(
        ValueError, match=_SCALAR.format(r"init_val\[0\]", description)
    ) as info:
        loopax.while_loop(
            cond_fun,
            lambda c: c,
            (scalar, jnp.zeros(3)),
            buffers=lambda c: c[0],
            max_steps=3,
        )
    assert not calls
    assert "a 0-d array has no entries to index" in str(info.value)


def test_scalar_buffer_is_rejected_by_scan_and_fori_loop():
    with pytest.raises(ValueError, match=_SCALAR.format(r"init\['n'\]", r"int32\[\]")):
        loopax.scan(
            lambda c, x: (c, x),
            {"n": jnp.array(0), "ys": jnp.zeros(3)},
            jnp.ones(3),
            buffers=lambda c: c["n"],
        )
    with pytest.raises(
        ValueError, match=_SCALAR.format(r"init_val\[0\]", r"float32\[\]")
    ):
        loopax.fori_loop(
            0,
            3,
            lambda i, c: c,
            (jnp.array(0.0), jnp.zeros(3)),
            buffers=lambda c: c[0],
        )
