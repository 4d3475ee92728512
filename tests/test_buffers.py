"""`loopax.Buffer`, `loopax.buffer_at_set` and `buffers=` in loops (also nested)."""

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import KINDS, assert_tree_allclose, loop_kwargs

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
