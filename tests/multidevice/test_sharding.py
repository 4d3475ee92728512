"""loopax on 8 simulated devices: automatic, explicit and manual (`shard_map`) mesh
axes, against `lax.scan` (every step stored) or the same computation done per
device with `lax` control flow."""

import functools as ft

import jax
import jax.lax as lax
import jax.numpy as jnp
import pytest
from helpers import assert_tree_allclose
from hlo_collectives import collectives_in_loops
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import loopax


STEPS = 6
LOOPS = {
    "checkpointed": dict(kind="checkpointed", checkpoints=2),
    "checkpointed_max_steps": dict(kind="checkpointed", checkpoints=2, max_steps=8),
    "store_all": dict(kind="checkpointed", checkpoints=8, max_steps=8),
    "bounded": dict(kind="bounded", max_steps=8, base=2),
}
ALL = [*LOOPS, "scan", "fori_loop"]
# Grad of grad compiles slowly (up to 2 minutes on a loaded 2-core machine for the
# online controller), so only these kinds run it here; tests/test_transformations.py
# covers grad of grad for every kind on one device.
GRAD_OF_GRAD = ("store_all", "bounded")


def _step(w, y):
    return jnp.tanh(y @ w)


def _loop(name, w, y):
    """`STEPS` steps of `_step`, by loopax."""
    if name == "scan":
        return loopax.scan(
            lambda c, _: (_step(w, c), None), y, length=STEPS, checkpoints=2
        )[0]
    if name == "fori_loop":
        return loopax.fori_loop(
            0, STEPS, lambda i, c: _step(w, c), y, kind="checkpointed", checkpoints=2
        )
    out = loopax.while_loop(
        lambda c: c[0] < STEPS,
        lambda c: (c[0] + 1, _step(w, c[1])),
        (0, y),
        **LOOPS[name],
    )
    return out[1]


def _reference(w, y):
    return lax.scan(lambda c, _: (_step(w, c), None), y, length=STEPS)[0]


def _loss(fn):
    return lambda w, y: jnp.sum(fn(w, y) ** 2)


def _data(mesh, y_spec, w_spec):
    y = jnp.linspace(-1.0, 1.0, 16 * 8).reshape(16, 8)
    w = jnp.linspace(-0.6, 0.5, 64).reshape(8, 8)
    return (
        jax.device_put(w, NamedSharding(mesh, w_spec)),
        jax.device_put(y, NamedSharding(mesh, y_spec)),
    )


@pytest.mark.parametrize("name", ["checkpointed", "store_all", "bounded", "scan"])
@pytest.mark.parametrize("parallel", ["data", "model"])
def test_automatic_axes(name, parallel):
    """Sharding propagated by XLA (automatic axes): data parallel (batch sharded,
    weights replicated) and model parallel (weights' columns sharded)."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    specs = (P("x", None), P()) if parallel == "data" else (P(), P(None, "x"))
    w, y = _data(mesh, *specs)
    got = jax.jit(jax.grad(_loss(lambda w, y: _loop(name, w, y)), argnums=(0, 1)))(w, y)
    want = jax.grad(_loss(_reference), argnums=(0, 1))(w, y)
    assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_explicit_axes(name):
    """`jax.make_mesh`'s default explicit axes: the sharding is part of the type;
    every array loopax builds keeps it. jit, grad, jvp, vmap and grad of grad."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    w, y = _data(mesh, P("x", None), P())

    def fn(w, y):
        return _loop(name, w, y)

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(_loss(fn), argnums=(0, 1)))(w, y)
        assert jax.typeof(got[1]).sharding.spec == P("x", None)
        assert_tree_allclose(got, jax.grad(_loss(_reference), argnums=(0, 1))(w, y))
        t = (0.1 * w, jnp.ones_like(y))
        assert_tree_allclose(
            jax.jit(lambda w, y: jax.jvp(fn, (w, y), t))(w, y),
            jax.jvp(_reference, (w, y), t),
        )
        ys = jnp.stack([y, 0.5 * y])
        assert_tree_allclose(
            jax.jit(jax.vmap(fn, in_axes=(None, 0)))(w, ys),
            jax.vmap(_reference, in_axes=(None, 0))(w, ys),
        )

        if name not in GRAD_OF_GRAD:
            return

        def grad_of_grad(f):
            return jax.grad(lambda w: jnp.sum(jax.grad(_loss(f), argnums=1)(w, y) ** 2))

        assert_tree_allclose(
            jax.jit(grad_of_grad(fn))(w),
            grad_of_grad(_reference)(w),
            rtol=1e-4,
            atol=1e-6,
        )


@pytest.mark.parametrize("name", ["checkpointed", "bounded", "scan"])
def test_2d_mesh_vmap(name):
    """A 2-D explicit mesh (batch x model), the loop vmapped over a third axis, and
    its gradient."""
    mesh = jax.make_mesh((2, 4), ("b", "m"), axis_types=(AxisType.Explicit,) * 2)
    scale = jax.device_put(jnp.linspace(0.5, 1.5, 8), NamedSharding(mesh, P("m")))
    y = jnp.linspace(-1.0, 1.0, 3 * 16 * 8).reshape(3, 16, 8)
    ys = jax.device_put(y, NamedSharding(mesh, P(None, "b", "m")))

    def step(s, y):
        return jnp.tanh(y * s[None, :])

    def run(s, y):
        if name == "scan":
            f = lambda c, _: (step(s, c), None)  # noqa: E731
            return loopax.scan(f, y, length=STEPS, checkpoints=2)[0]
        return loopax.while_loop(
            lambda c: c[0] < STEPS,
            lambda c: (c[0] + 1, step(s, c[1])),
            (0, y),
            **LOOPS[name],
        )[1]

    def reference(s, y):
        return lax.scan(lambda c, _: (step(s, c), None), y, length=STEPS)[0]

    def loss(fn):
        return lambda s, ys: jnp.sum(jax.vmap(fn, in_axes=(None, 0))(s, ys) ** 2)

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss(run), argnums=(0, 1)))(scale, ys)
        assert jax.typeof(got[1]).sharding.spec == P(None, "b", "m")
        assert_tree_allclose(got, jax.grad(loss(reference), argnums=(0, 1))(scale, ys))


# -- shard_map: a trip count per device ---------------------------------------------


def _per_device(name, kappa, x, n):
    """Per device: `n[0]` steps of y -> sin(y) * kappa + 0.1 (kappa replicated)."""

    def body(c):
        i, y = c
        return i + 1, jnp.sin(y) * kappa + 0.1

    def cond(c):
        return c[0] < n[0]

    if name == "lax.while_loop":
        return lax.while_loop(cond, body, (0, x))[1]
    return loopax.while_loop(cond, body, (0, x), **LOOPS.get(name, dict(kind=name)))[1]


def _per_device_reference(kappa, x, n):
    """The same per device, as a scan over 8 conds (every step stored). `kappa` is
    cast to varying first so that no collective sits inside the `cond`."""
    kappa = lax.pcast(kappa, ("x",), to="varying")

    def step(y, i):
        return lax.cond(
            i < n[0], lambda y: jnp.sin(y) * kappa + 0.1, lambda y: y, y
        ), None

    return lax.scan(step, x, jnp.arange(8))[0]


def _shard(mesh, fn):
    return jax.shard_map(
        fn, mesh=mesh, in_specs=(P(), P("x"), P("x")), out_specs=P("x")
    )


@pytest.fixture
def per_device_inputs():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("x")))  # noqa: E731
    x = put(jnp.linspace(0.1, 1.0, 16))
    n = put(jnp.array([2, 5, 0, 7, 3, 1, 6, 4], jnp.int32))  # Steps per device.
    return mesh, jnp.array(0.9), x, n


@pytest.mark.parametrize("name", ["lax", *LOOPS])
def test_shard_map_trip_count_per_device(name, per_device_inputs):
    """As `lax.while_loop` forward; reverse mode gives the reference gradient with
    respect to the replicated `kappa` and the per-device `x`, and the compiled
    backward loops hold no collective (the sum over devices of `kappa`'s cotangent
    runs once, after them)."""
    mesh, kappa, x, n = per_device_inputs
    with jax.set_mesh(mesh):
        want = jax.jit(
            _shard(mesh, lambda k, x, n: _per_device("lax.while_loop", k, x, n))
        )(kappa, x, n)
        got = jax.jit(_shard(mesh, lambda k, x, n: _per_device(name, k, x, n)))(
            kappa, x, n
        )
        assert_tree_allclose(got, want)
        assert_tree_allclose(
            want, jax.jit(_shard(mesh, _per_device_reference))(kappa, x, n)
        )
        if name == "lax":
            return

        def loss(fn):
            return lambda k, x: jnp.sum(_shard(mesh, fn)(k, x, n) ** 2)

        grad = jax.jit(
            jax.grad(loss(lambda k, x, n: _per_device(name, k, x, n)), argnums=(0, 1))
        )
        assert collectives_in_loops(grad.lower(kappa, x).compile().as_text()) == 0
        want = jax.jit(jax.grad(loss(_per_device_reference), argnums=(0, 1)))(kappa, x)
        assert_tree_allclose(grad(kappa, x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["lax", *LOOPS])
def test_shard_map_replicated_carry_leaf(name, per_device_inputs):
    """A replicated carry leaf `t` with a per-device trip count: forward as
    `lax.while_loop`; the gradient with respect to `x` is right; the gradient with
    respect to `t` would need a sum over devices inside the backward loop, and
    raises an error that names the fix."""
    mesh, kappa, x, n = per_device_inputs

    def fn(loop, t0, x, n):
        def body(c):
            i, t, y = c
            return i + 1, t * 0.5, jnp.sin(y) * t

        def cond(c):
            return c[0] < n[0]

        if loop == "lax.while_loop":
            return lax.while_loop(cond, body, (0, t0, x))[2]
        return loopax.while_loop(
            cond, body, (0, t0, x), **LOOPS.get(loop, dict(kind=loop))
        )[2]

    def ref(t0, x, n):
        def step(c, i):
            t, y = c
            t_v = lax.pcast(t, ("x",), to="varying")
            new = lax.cond(i < n[0], lambda y: jnp.sin(y) * t_v, lambda y: y, y)
            return (t * 0.5, new), None

        return lax.scan(step, (t0, x), jnp.arange(8))[0][1]

    with jax.set_mesh(mesh):
        want = jax.jit(_shard(mesh, lambda t, x, n: fn("lax.while_loop", t, x, n)))(
            kappa, x, n
        )
        got = jax.jit(_shard(mesh, lambda t, x, n: fn(name, t, x, n)))(kappa, x, n)
        assert_tree_allclose(got, want)
        if name == "lax":
            return

        def loss(f):
            return lambda t, x: jnp.sum(_shard(mesh, f)(t, x, n) ** 2)

        g = jax.jit(jax.grad(loss(lambda t, x, n: fn(name, t, x, n)), argnums=1))(
            kappa, x
        )
        assert_tree_allclose(g, jax.jit(jax.grad(loss(ref), argnums=1))(kappa, x))
        with pytest.raises(ValueError, match="pcast"):
            jax.jit(jax.grad(loss(lambda t, x, n: fn(name, t, x, n)), argnums=0))(
                kappa, x
            )


def test_memory_budget_is_per_device():
    """`memory_budget` counts the bytes one device holds of each sharded leaf: a
    committed array, or a tracer on explicit axes; a replicated leaf counts whole.
    (A 256 KiB carry, 32 KiB per device; 1 MiB holds 3 global copies, 31 per-device
    ones, with the controllers' 1 KiB per slot.)"""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    y = jax.device_put(jnp.zeros((1024, 64)), NamedSharding(mesh, P("x", None)))
    budget = 2**20
    assert loopax.checkpoints_for_budget(jnp.zeros((1024, 64)), budget) == 3
    assert loopax.checkpoints_for_budget(y, budget) == 31
    replicated = jax.device_put(jnp.zeros((1024, 64)), NamedSharding(mesh, P()))
    assert loopax.checkpoints_for_budget(replicated, budget) == 3
    with jax.set_mesh(mesh):
        counts = []

        @jax.jit
        def f(y):
            counts.append(loopax.checkpoints_for_budget(y, budget))
            return y

        f(y)
    assert counts == [31]


@pytest.mark.parametrize(
    "name, check_vma",
    [("lax", True), ("checkpointed", True), ("bounded", True), ("checkpointed", False)],
)
def test_shard_map_vmap_batched_predicate(name, check_vma, per_device_inputs):
    """`vmap` inside `shard_map`: a predicate batched *and* different per device."""
    mesh, kappa, x, n = per_device_inputs

    def local(loop, k, x, n):
        def body(c):
            i, y = c
            return i + 1, jnp.sin(y) * k + 0.1

        def one(xe):
            def cond(c):
                return c[0] < n[0] + (xe > 0.5).astype(jnp.int32)

            if loop == "lax.while_loop":
                return lax.while_loop(cond, body, (0, xe))[1]
            return loopax.while_loop(
                cond, body, (0, xe), **LOOPS.get(loop, {"kind": loop})
            )[1]

        return jax.vmap(one)(x)

    def reference(k, x, n):
        if check_vma:
            k = lax.pcast(k, ("x",), to="varying")

        def one(xe):
            stop = n[0] + (xe > 0.5).astype(jnp.int32)

            def step(y, i):
                return lax.cond(
                    i < stop, lambda y: jnp.sin(y) * k + 0.1, lambda y: y, y
                ), None

            return lax.scan(step, xe, jnp.arange(9))[0]

        return jax.vmap(one)(x)

    def shard(fn):
        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P(), P("x"), P("x")),
            out_specs=P("x"),
            check_vma=check_vma,
        )

    with jax.set_mesh(mesh):
        want = jax.jit(shard(lambda k, x, n: local("lax.while_loop", k, x, n)))(
            kappa, x, n
        )
        assert_tree_allclose(
            jax.jit(shard(lambda k, x, n: local(name, k, x, n)))(kappa, x, n), want
        )
        if name == "lax":
            return

        def loss(fn):
            return lambda k, x: jnp.sum(shard(fn)(k, x, n) ** 2)

        got = jax.jit(
            jax.grad(loss(lambda k, x, n: local(name, k, x, n)), argnums=(0, 1))
        )(kappa, x)
        assert_tree_allclose(
            got, jax.jit(jax.grad(loss(reference), argnums=(0, 1)))(kappa, x)
        )


@pytest.mark.parametrize("name", ["checkpointed", "scan"])
def test_shard_map_data_parallel_no_collective_in_loops(name):
    """Data parallel inside `shard_map` (same trip count everywhere): the weights'
    cotangent is summed over devices once, after the backward loop (`lax.scan`
    sums it in every step)."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    w, y = _data(mesh, P("x", None), P())

    def loss(fn):
        def local(w, y):
            return lax.psum(jnp.sum(fn(w, y) ** 2), "x")

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x")), out_specs=P())

    grad = jax.jit(jax.grad(loss(lambda w, y: _loop(name, w, y)), argnums=(0, 1)))
    assert collectives_in_loops(grad.lower(w, y).compile().as_text()) == 0
    reference = jax.jit(jax.grad(loss(_reference), argnums=(0, 1)))
    assert collectives_in_loops(reference.lower(w, y).compile().as_text()) > 0
    assert_tree_allclose(grad(w, y), reference(w, y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["checkpointed", "bounded"])
def test_sharded_buffers(name):
    """A buffer sharded over an explicit axis (its columns), written once per step;
    and inside `shard_map` with a trip count per device."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    w, y = _data(mesh, P(None, "x"), P())
    buf = jax.device_put(
        jnp.zeros((STEPS, 16, 8)), NamedSharding(mesh, P(None, None, "x"))
    )
    del w

    def run(y, buf):
        def body(c):
            i, y, buf = c
            return i + 1, jnp.sin(y) * 0.9, buf.at[i].set(y * y)

        out = loopax.while_loop(
            lambda c: c[0] < STEPS,
            body,
            (0, y, buf),
            buffers=lambda c: c[2],
            **LOOPS[name],
        )
        return jnp.sum(out[2] * jnp.arange(1.0, STEPS + 1.0)[:, None, None]) + jnp.sum(
            out[1]
        )

    def reference(y, buf):
        def step(c, i):
            y, buf = c
            return (jnp.sin(y) * 0.9, buf.at[i].set(y * y)), None

        (y, buf), _ = lax.scan(step, (y, buf), jnp.arange(STEPS))
        return jnp.sum(buf * jnp.arange(1.0, STEPS + 1.0)[:, None, None]) + jnp.sum(y)

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(run, argnums=(0, 1)))(y, buf)
        assert jax.typeof(got[1]).sharding.spec == P(None, None, "x")
        assert_tree_allclose(got, jax.jit(jax.grad(reference, argnums=(0, 1)))(y, buf))


@pytest.mark.parametrize("name", ["checkpointed", "bounded"])
def test_shard_map_buffer_trip_count_per_device(name, per_device_inputs):
    mesh, kappa, x, n = per_device_inputs

    def local(loop, k, x, n):
        buf = lax.pcast(jnp.zeros((8, 2)), ("x",), to="varying")

        def body(c):
            i, y, buf = c
            return i + 1, jnp.sin(y) * k, buf.at[i].set(y)

        def cond(c):
            return c[0] < n[0]

        init = (0, x, buf)
        if loop == "reference":
            k = lax.pcast(k, ("x",), to="varying")

            def advance(c):
                i, y, buf = c
                return i + 1, jnp.sin(y) * k, buf.at[i].set(y)

            def step(c, i):
                return lax.cond(i < n[0], advance, lambda c: c, c), None

            out = lax.scan(step, init, jnp.arange(8))[0]
        else:
            out = loopax.while_loop(
                cond, body, init, buffers=lambda c: c[2], **LOOPS[loop]
            )
        return jnp.sum(out[2] * jnp.arange(1.0, 9.0)[:, None]) + jnp.sum(out[1])

    def loss(loop):
        f = jax.shard_map(
            lambda k, x, n: local(loop, k, x, n)[None],
            mesh=mesh,
            in_specs=(P(), P("x"), P("x")),
            out_specs=P("x"),
        )
        return lambda k, x: jnp.sum(f(k, x, n))

    with jax.set_mesh(mesh):
        got = jax.jit(jax.grad(loss(name), argnums=(0, 1)))(kappa, x)
        want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1)))(kappa, x)
        assert_tree_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scan_lax_kind_stacked_outputs():
    """`loopax.scan(kind="lax")` preallocates its stacked outputs: typed like `y`
    on explicit axes and inside `shard_map`."""

    def f(c, x):
        return jnp.sin(c) * x, c * 2

    def run(y, kind):
        return loopax.scan(f, y, jnp.linspace(0.5, 1.5, 4), kind=kind)

    def reference(y):
        return lax.scan(f, y, jnp.linspace(0.5, 1.5, 4))

    explicit = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    y = jax.device_put(jnp.linspace(0.0, 1.0, 16), NamedSharding(explicit, P("x")))
    with jax.set_mesh(explicit):
        got = jax.jit(lambda y: run(y, "lax"))(y)
        assert jax.typeof(got[1]).sharding.spec == P(None, "x")
        assert_tree_allclose(got, reference(y))
        assert_tree_allclose(
            jax.jit(lambda y: jax.jvp(lambda y: run(y, "lax"), (y,), (y,)))(y),
            jax.jvp(reference, (y,), (y,)),
        )
    auto = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    for kind in ("lax", "checkpointed"):
        sharded = jax.shard_map(
            ft.partial(run, kind=kind),
            mesh=auto,
            in_specs=P("x"),
            out_specs=(P("x"), P(None, "x")),
        )
        assert_tree_allclose(
            jax.jit(sharded)(jnp.linspace(0.0, 1.0, 16)),
            reference(jnp.linspace(0.0, 1.0, 16)),
        )
