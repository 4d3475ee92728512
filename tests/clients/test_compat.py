"""The calling conventions of `equinox.internal.while_loop`'s clients, without the clients.

Each test is a minimal version of something Diffrax, Optimistix or Lineax does, run on
`loopax.while_loop` and on `equinox.internal.while_loop`, which must agree. Needs only
Equinox (a dependency of loopax), so it runs without the `clients` extra.
"""

import functools as ft

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import pytest
from client_helpers import assert_close

import loopax


LOOPS = {"loopax": loopax.while_loop, "equinox": eqxi.while_loop}
REVERSE = ("checkpointed", "bounded")


def run_both(make, *args, transform=jax.grad):
    """`transform(make(while_loop))(*args)` for both loops: equal."""
    out = {name: jax.jit(transform(make(loop)))(*args) for name, loop in LOOPS.items()}
    assert_close(out["loopax"], out["equinox"], rtol=1e-6, atol=1e-6)
    return out["loopax"]


@pytest.mark.parametrize("kind", REVERSE)
def test_full_keyword_set(kind):
    """Every keyword at once, as Diffrax's Runge-Kutta stage loop passes them
    (`base` and `checkpoints` both given whatever the kind)."""

    def make(while_loop):
        def f(x):
            def body(c):
                i, y, ys = c
                return i + 1, jnp.sin(y) * x, ys.at[i].set(y)

            init = (0, x, jnp.zeros(4))
            out = while_loop(
                lambda c: c[0] < 4,
                body,
                init,
                max_steps=4,
                buffers=lambda c: c[2],
                kind=kind,
                checkpoints=4,
                base=4,
            )
            return jnp.sum(out[2]) + out[1]

        return f

    run_both(make, 0.7)


@pytest.mark.parametrize("kind", REVERSE)
def test_buffers_list_with_none(kind):
    """Diffrax's `_outer_buffers`: a list of nodes, some `None` (no dense output)."""

    def make(while_loop):
        def f(x):
            def body(c):
                i, y, ys, dense = c
                assert dense is None
                return i + 1, y * x, ys.at[i].set(y), dense

            out = while_loop(
                lambda c: c[0] < 5,
                body,
                (0, x, jnp.zeros(6), None),
                max_steps=6,
                buffers=lambda c: [c[2], c[3]],
                kind=kind,
            )
            return jnp.sum(out[2] ** 2)

        return f

    run_both(make, 0.9)


@pytest.mark.parametrize(
    "kind, inner_kind",
    # As Diffrax's RecursiveCheckpointAdjoint, DirectAdjoint and ForwardMode.
    [("checkpointed", "checkpointed"), ("bounded", "bounded"), ("lax", "lax")],
)
def test_outer_buffer_into_inner_loop(kind, inner_kind):
    """Diffrax's `SaveAt(ts=...)`: the step loop's save buffer is a buffer of an inner
    loop too, written there with `.at[i].set(x)` (no `pred`). Under `vmap` the outer
    loop's batch elements finish at different steps."""

    def make(while_loop):
        def f(x, n):
            def body(c):
                i, y, k, ys = c
                y = jnp.cos(y) * x

                def inner_body(d):
                    j, k, ys = d
                    return j + 1, k + 1, ys.at[k].set(y + j)

                _, k, ys = while_loop(
                    lambda d: d[0] < 2,
                    inner_body,
                    (0, k, ys),
                    max_steps=2,
                    buffers=lambda d: d[2],
                    kind=inner_kind,
                    checkpoints=2,
                )
                return i + 1, y, k, ys

            out = while_loop(
                lambda c: c[0] < n,
                body,
                (0, x, 0, jnp.zeros(12)),
                max_steps=6,
                buffers=lambda c: c[3],
                kind=kind,
            )
            return jnp.sum(out[3] ** 2) + out[1]

        return f

    if kind == "lax":
        # kind="lax" loops are forward-only in both libraries: use jvp.
        def transform(f):
            return jax.vmap(lambda x, n: jax.jvp(lambda x: f(x, n), (x,), (1.0,)))
    else:

        def transform(f):
            return jax.vmap(jax.value_and_grad(f))

    run_both(
        make, jnp.array([0.5, 0.8, 1.1]), jnp.array([2, 6, 4]), transform=transform
    )


@pytest.mark.parametrize("kind", ("lax", *REVERSE))
def test_equinox_buffer_at_set_on_loopax_buffer(kind):
    """Diffrax's `SaveAt(steps=True)` and dense output call
    `equinox.internal.buffer_at_set(buf, i, x, pred=...)` on what the loop gives them;
    on a loopax `Buffer` that takes Equinox's fallback (`buf.at[i].get()` then
    `buf.at[i].set(x)`). Batched `pred` under `vmap` included."""

    def make(while_loop):
        def f(x, n):
            def body(c):
                i, y, k, ys = c
                y = y * x
                keep = (i % 2) == 0
                ys = eqxi.buffer_at_set(ys, k, y, pred=keep)
                return i + 1, y, k + jnp.where(keep, 1, 0), ys

            out = while_loop(
                lambda c: c[0] < n,
                body,
                (0, x, 0, jnp.full(8, jnp.inf)),
                max_steps=8,
                buffers=lambda c: c[3],
                kind=kind,
            )
            ys = out[3]
            return jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0) ** 2)

        return f

    if kind == "lax":

        def transform(f):
            return jax.vmap(lambda x, n: jax.jvp(lambda x: f(x, n), (x,), (1.0,)))
    else:

        def transform(f):
            return jax.vmap(jax.value_and_grad(f))

    run_both(
        make, jnp.array([0.5, 0.8, 1.1]), jnp.array([3, 8, 5]), transform=transform
    )


def test_named_call():
    """Diffrax binds `jax.named_call(eqxi.while_loop, name="outer-loop")` at import
    and passes `kind` through `functools.partial`."""
    named = ft.partial(
        jax.named_call(loopax.while_loop, name="outer-loop"), kind="checkpointed"
    )

    def f(x):
        return named(
            lambda c: c[0] < 3,
            lambda c: (c[0] + 1, c[1] * x),
            (0, x),
            max_steps=3,
            checkpoints=None,
        )[1]

    assert jnp.allclose(jax.jit(jax.grad(f))(0.5), 4 * 0.5**3)


def test_python_scalars_in_carry_and_constant_predicate():
    """Diffrax keeps statically-known carry entries (`made_jump=False`) as Python
    scalars; Equinox's own `scan` passes `cond_fun=lambda _: True`."""

    def make(while_loop):
        def f(x):
            def body(c):
                i, y, flag = c
                return i + 1, y * x, False

            return while_loop(
                lambda c: True, body, (0, x, False), max_steps=3, kind="checkpointed"
            )[1]

        return f

    run_both(make, 0.5)
