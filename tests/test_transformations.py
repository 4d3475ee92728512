"""`kind="checkpointed"` under every transformation `lax.while_loop` supports, plus
reverse mode: jvp, linearize, jacfwd, grad, vjp, jacrev, hessian (forward over
reverse), grad of grad (reverse over reverse), and vmap of each; each against the
full-storage reference (`lax.scan` over `lax.cond`), with buffers and closed-over
parameters, for several (trip count, checkpoints).
"""

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose, scan_reference_loop

import loopax


BOUND = 12  # The reference's scan length and the buffers' length.
THETA = jnp.array([[0.9, 0.2, -0.1], [-0.3, 0.8, 0.4], [0.1, -0.2, 0.7]])
X0 = jnp.array([0.5, -1.0, 0.25])
DTHETA = jnp.full((3, 3), 0.1) + jnp.eye(3)
DX = jnp.array([1.0, -0.5, 2.0])

# (trip count, checkpoints, max_steps): a loop that never runs, one slot, a few
# slots, no bound, and every state stored (`checkpoints >= max_steps`).
CONFIGS = [(0, 2, BOUND), (5, 1, BOUND), (9, 2, BOUND), (7, 3, None), (6, BOUND, BOUND)]
IDS = ["n0", "c1", "c2", "unbounded", "store_all"]


def _make(theta, x0, n, run):
    """A loop with a closed-over parameter, a buffer written once per step, an integer
    counter and a batched-able trip count `n`."""

    def cond(carry):
        return carry[0] < carry[1]

    def body(carry):
        i, n, x, buf = carry
        x_new = jnp.tanh(theta @ x) + 0.1 * x
        return i + 1, n, x_new, buf.at[i].set(jnp.sum(x_new * x))

    init = (jnp.int32(0), jnp.asarray(n, jnp.int32), x0, jnp.zeros(BOUND))
    _, _, x, buf = run(cond, body, init)
    return jnp.concatenate([x, buf])


def _loopax(checkpoints, max_steps):
    def run(cond, body, init):
        return loopax.while_loop(
            cond,
            body,
            init,
            checkpoints=checkpoints,
            max_steps=max_steps,
            buffers=lambda c: c[3],
        )

    return run


def _reference(cond, body, init):
    return scan_reference_loop(cond, body, init, BOUND)


def _functions(config):
    n, checkpoints, max_steps = config
    run = _loopax(checkpoints, max_steps)

    def out(theta, x0, n=n):
        return _make(theta, x0, n, run)

    def ref(theta, x0, n=n):
        return _make(theta, x0, n, _reference)

    return out, ref


def _scalar(f):
    return lambda theta, x0, *n: jnp.sum(jnp.sin(f(theta, x0, *n)))


TRANSFORMS = {
    "jvp": lambda f: lambda th, x: jax.jvp(f, (th, x), (DTHETA, DX)),
    "linearize": lambda f: lambda th, x: jax.linearize(f, th, x)[1](DTHETA, DX),
    "jacfwd": lambda f: jax.jacfwd(f, argnums=(0, 1)),
    "grad": lambda f: jax.grad(_scalar(f), argnums=(0, 1)),
    "vjp": lambda f: lambda th, x: jax.vjp(f, th, x)[1](jnp.arange(3.0 + BOUND)),
    "jacrev": lambda f: jax.jacrev(f, argnums=(0, 1)),
    "hessian": lambda f: jax.hessian(_scalar(f), argnums=1),
    "grad_of_grad": lambda f: jax.grad(
        lambda th, x: jnp.sum(jax.grad(_scalar(f), argnums=1)(th, x) ** 2),
        argnums=(0, 1),
    ),
}


# Reverse over reverse compiles slowly (the backward sweep's own backward sweep): it
# runs on the configurations that exercise distinct code paths.
CASES = [
    (name, config, id_)
    for name in TRANSFORMS
    for config, id_ in zip(CONFIGS, IDS, strict=True)
    if name != "grad_of_grad" or id_ in ("c2", "unbounded", "store_all")
]


@pytest.mark.parametrize(
    "name,config", [c[:2] for c in CASES], ids=[f"{c[0]}-{c[2]}" for c in CASES]
)
def test_transformation_matches_reference(name, config):
    out, ref = _functions(config)
    transform = TRANSFORMS[name]
    got = jax.jit(transform(out))(THETA, X0)
    want = jax.jit(transform(ref))(THETA, X0)
    assert_tree_allclose(got, want, rtol=2e-4, atol=2e-5)


# vmap of each: a batch of initial values *and trip counts*, so that the loop's
# predicate is batched (elements stop at different steps).
BATCH_X0 = jnp.stack([X0, -X0, 0.5 * X0])
BATCH_N = jnp.array([3, 7, 0], jnp.int32)


@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[4]], ids=["c2", "store_all"])
@pytest.mark.parametrize("name", TRANSFORMS)
def test_vmap_of_transformation(config, name):
    out, ref = _functions(config)

    def batched(f):
        def per_element(x, n):
            return TRANSFORMS[name](lambda th, x_: f(th, x_, n))(THETA, x)

        return jax.jit(jax.vmap(per_element))

    assert_tree_allclose(
        batched(out)(BATCH_X0, BATCH_N),
        batched(ref)(BATCH_X0, BATCH_N),
        rtol=2e-4,
        atol=2e-5,
    )


def test_transformation_inside_vmap_inside_grad():
    """The other nesting order: grad of a function that vmaps the loop."""
    out, ref = _functions(CONFIGS[2])

    def loss(f):
        return lambda th: jnp.sum(
            jax.vmap(lambda x, n: jnp.sin(f(th, x, n)))(BATCH_X0, BATCH_N)
        )

    assert_tree_allclose(
        jax.jit(jax.grad(loss(out)))(THETA),
        jax.jit(jax.grad(loss(ref)))(THETA),
        rtol=2e-4,
        atol=2e-5,
    )


# -- no per-step storage growing with the trip count ---------------------------------

LONG = 997  # A prime: no other dimension in these programs equals it by chance.


def _all_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The shapes of every value computed in `jaxpr` and in the jaxprs nested in it."""
    shapes = [
        tuple(v.aval.shape)
        for eqn in jaxpr.eqns
        for v in eqn.outvars
        if hasattr(v.aval, "shape")
    ]
    for sub in jex.core.subjaxprs(jaxpr):
        shapes += _all_shapes(sub)
    return shapes


@pytest.mark.parametrize(
    "name", ["jvp", "linearize", "grad", "hessian", "grad_of_grad"]
)
def test_no_residual_stacks_growing_with_trip_count(name):
    """With `max_steps=997` and 4 checkpoints, no array anywhere in the program
    (including inside the loops' bodies) has a dimension of 997: nothing is stored
    per step."""

    def run(cond, body, init):
        i, n, x, _ = init
        x = loopax.while_loop(
            lambda c: c[0] < c[1],
            lambda c: (c[0] + 1, c[1], jnp.tanh(THETA @ c[2]) + 0.1 * c[2]),
            (i, n, x),
            checkpoints=4,
            max_steps=LONG,
        )[2]
        return (i, n, x, jnp.zeros(BOUND))

    def f(theta, x0, n=500):
        return _make(theta, x0, n, run)

    jaxpr = jax.make_jaxpr(TRANSFORMS[name](f))(THETA, X0)
    shapes = _all_shapes(jaxpr.jaxpr)
    assert shapes, "the walk found no equations"
    assert not [s for s in shapes if LONG in s]


def test_store_all_does_store_per_step():
    """The check above can fail: with `checkpoints >= max_steps` the residuals *are*
    stacked per step (that is the store-all design)."""

    def f(x):
        return loopax.while_loop(
            lambda c: c[0] < 500,
            lambda c: (c[0] + 1, jnp.sin(c[1])),
            (0, x),
            checkpoints=LONG,
            max_steps=LONG,
        )[1].sum()

    shapes = _all_shapes(jax.make_jaxpr(jax.grad(f))(X0).jaxpr)
    assert [s for s in shapes if LONG in s]


@pytest.mark.parametrize("transform", ["forward", "grad"])
@pytest.mark.parametrize("use_ys", [False, True])
def test_unused_scan_outputs_are_never_computed(transform, use_ys):
    """The stacked outputs of a checkpointed `loopax.scan` that nothing uses are not
    computed, nor is a stack of zeros built for their cotangent: no 997-row array in
    the lowered program. Positive control: when the outputs are used, they are
    there."""

    def f(x):
        carry, ys = loopax.scan(
            lambda c, _: (jnp.sin(c), 2.0 * c), x, None, length=LONG, checkpoints=5
        )
        return jnp.sum(carry) + (jnp.sum(ys) if use_ys else 0.0)

    fn = jax.grad(f) if transform == "grad" else f
    text = jax.jit(fn).lower(X0).as_text()
    assert (f"tensor<{LONG}x" in text) == use_ys


def test_jvp_runs_one_loop_and_no_checkpointing():
    """Pure forward mode is one loop over primals and tangents: no recording sweep,
    no linear loop."""
    out, _ = _functions(CONFIGS[2])
    text = str(jax.make_jaxpr(TRANSFORMS["jvp"](out))(THETA, X0))
    assert text.count("loopax_checkpointed_loop") == 1
    assert "record=True" not in text
    assert "linear_loop" not in text


def test_hessian_of_closed_over_parameter_matches_finite_differences():
    """An independent check of second derivatives: the Hessian-vector product in
    the parameter direction against central differences of the gradient."""
    out, _ = _functions(CONFIGS[2])
    loss = _scalar(out)
    grad = jax.jit(jax.grad(loss))
    eps = 1e-3
    fd = (grad(THETA + eps * DTHETA, X0) - grad(THETA - eps * DTHETA, X0)) / (2 * eps)
    hvp = jax.jit(
        lambda th: jax.jvp(lambda t: jax.grad(loss)(t, X0), (th,), (DTHETA,))
    )(THETA)[1]
    np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-3)


# -- compositions with other JAX machinery --------------------------------------------


def _inner(x):
    return loopax.while_loop(
        lambda c: c[0] < 6,
        lambda c: (c[0] + 1, jnp.sin(c[1]) * 1.2),
        (0, x),
        checkpoints=2,
    )[1]


def _inner_ref(x):
    return jax.lax.fori_loop(0, 6, lambda i, y: jnp.sin(y) * 1.2, x)


def _in_scan(inner):
    return lambda x: jax.lax.scan(
        lambda y, _: (inner(y) * 0.9, None), x, None, length=3
    )[0]


def _nested(inner):
    def outer(x):
        def body(c):
            return c[0] + 1, inner(c[1]) * 0.9

        if inner is _inner:
            return loopax.while_loop(lambda c: c[0] < 3, body, (0, x), checkpoints=2)[1]
        return jax.lax.fori_loop(0, 3, lambda i, y: body((i, y))[1], x)

    return outer


def _remat(inner):
    return jax.checkpoint(inner)


def _sum_grad_sq(f):
    return lambda x: jnp.sum(jax.grad(lambda y: jnp.sum(f(y)))(x) ** 2)


COMPOSITIONS = {
    "remat_grad": lambda inner: jax.grad(lambda x: jnp.sum(_remat(inner)(x))),
    "in_lax_scan_grad": lambda inner: jax.grad(lambda x: jnp.sum(_in_scan(inner)(x))),
    "in_lax_scan_jvp": lambda inner: lambda x: jax.jvp(_in_scan(inner), (x,), (x,)),
    "nested_grad": lambda inner: jax.grad(lambda x: jnp.sum(_nested(inner)(x))),
    "nested_hessian": lambda inner: jax.hessian(lambda x: jnp.sum(_nested(inner)(x))),
    "nested_grad_of_grad": lambda inner: jax.grad(_sum_grad_sq(_nested(inner))),
    "linearize_then_vmap": lambda inner: (
        lambda x: jax.vmap(jax.linearize(inner, x)[1])(jnp.eye(3))
    ),
    "jvp_of_linearized": lambda inner: (
        lambda x: jax.jvp(lambda y: jax.linearize(inner, y)[1](y), (x,), (x,))
    ),
}


# Reverse over reverse through nested checkpointed loops compiles for minutes on two
# cores (the longest test by far); grad of grad of one loop runs by default
# (`test_transformation_matches_reference`, `test_vmap_of_transformation`).
_SLOW_COMPOSITIONS = {"nested_grad_of_grad"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_COMPOSITIONS else n
        for n in COMPOSITIONS
    ],
)
def test_composition_matches_reference(name):
    x = jnp.array([0.5, 1.5, 2.5])
    got = jax.jit(COMPOSITIONS[name](_inner))(x)
    want = jax.jit(COMPOSITIONS[name](_inner_ref))(x)
    assert_tree_allclose(got, want, rtol=2e-4, atol=2e-5)


def _scan_pair(x, scan):
    return scan(lambda y, t: (jnp.sin(y) * t, jnp.sum(y)), x, jnp.linspace(0.5, 1.5, 9))


def _loopax_scan(f, init, xs):
    return loopax.scan(f, init, xs, checkpoints=2)


SCAN_TRANSFORMS = {
    "jvp": lambda s: lambda x: jax.jvp(lambda y: _scan_pair(y, s), (x,), (x,)),
    "hessian": lambda s: jax.hessian(lambda x: jnp.sum(_scan_pair(x, s)[1])),
    "grad_of_grad": lambda s: jax.grad(_sum_grad_sq(lambda x: _scan_pair(x, s)[0])),
}


@pytest.mark.parametrize("name", SCAN_TRANSFORMS)
def test_loopax_scan_transformations(name):
    """`loopax.scan` (offline revolve placement) under forward and second-order modes."""
    x = jnp.array([0.5, 1.5, 2.5])
    got = jax.jit(SCAN_TRANSFORMS[name](_loopax_scan))(x)
    want = jax.jit(SCAN_TRANSFORMS[name](jax.lax.scan))(x)
    assert_tree_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_fori_loop_jacfwd_with_traced_bounds():
    """`loopax.fori_loop` with traced bounds takes the while-loop path; forward mode
    works there too."""

    def f(x, upper, fori):
        return fori(0, upper, lambda i, y: jnp.cos(y) * i.astype(y.dtype), x)

    x = jnp.array([0.5, 1.5, 2.5])
    got = jax.jit(jax.jacfwd(lambda x, u: f(x, u, ft_fori)))(x, 5)
    want = jax.jit(jax.jacfwd(lambda x, u: f(x, u, jax.lax.fori_loop)))(x, 5)
    assert_tree_allclose(got, want)


def ft_fori(lower, upper, body, init):
    return loopax.fori_loop(lower, upper, body, init, checkpoints=2)


_SHARD_LOOPS = {
    "checkpointed": dict(kind="checkpointed", checkpoints=2),
    "store_all": dict(kind="checkpointed", checkpoints=8, max_steps=8),
    "checkpointed_max_steps": dict(kind="checkpointed", checkpoints=2, max_steps=8),
    "bounded": dict(kind="bounded", max_steps=8, base=2),
    "lax": dict(kind="lax"),
}


def _shard_loop(options, scale, x, use_scan=False):
    """Six steps whose body mixes the sharded `x`, a replicated `scale` and a
    buffer written once per step."""
    if use_scan:
        return loopax.scan(
            lambda y, t: (jnp.sin(y) * scale * t, jnp.sum(y)),
            x,
            jnp.linspace(0.8, 1.2, 6),
            checkpoints=2,
        )

    def body(c):
        i, y, buf = c
        buf = buf.at[i].set(jnp.sum(y))
        return i + 1, jnp.sin(y) * scale, buf

    # As for `lax.while_loop`: a carry that the body makes vary over the mesh axis
    # starts out varying.
    init = (0, x, jax.lax.pcast(jnp.zeros(8, x.dtype), ("d",), to="varying"))
    _, y, buf = loopax.while_loop(
        lambda c: c[0] < 6, body, init, buffers=lambda c: c[2], **options
    )
    return y, buf


def _shard_ref(scale, x, use_scan=False):
    if use_scan:
        return jax.lax.scan(
            lambda y, t: (jnp.sin(y) * scale * t, jnp.sum(y)),
            x,
            jnp.linspace(0.8, 1.2, 6),
        )

    def body(i, c):
        y, buf = c
        return jnp.sin(y) * scale, buf.at[i].set(jnp.sum(y))

    return jax.lax.fori_loop(0, 6, body, (x, jnp.zeros(8, x.dtype)))


@pytest.mark.parametrize("loop", [*_SHARD_LOOPS, "scan"])
def test_inside_shard_map(loop):
    """Under `jax.shard_map` with its default `check_vma=True` (every value's
    varying mesh axes are type-checked): forward, jvp, grad with respect to the
    sharded input and the replicated parameter, and vmap, equal the plain loop's."""
    mesh = jax.make_mesh((1,), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    use_scan = loop == "scan"
    options = {} if use_scan else _SHARD_LOOPS[loop]

    def loss(fn, scale, x):
        y, out = fn(scale, x)
        return jnp.sum(y**2) + jnp.sum(out * jnp.arange(out.shape[0], dtype=out.dtype))

    def sharded(scale, x):
        return jax.shard_map(
            lambda s, y: _shard_loop(options, s, y, use_scan),
            mesh=mesh,
            in_specs=(jax.sharding.PartitionSpec(), spec),
            out_specs=(spec, spec),
        )(scale, x)

    def reference(scale, x):
        return _shard_ref(scale, x, use_scan)

    x = jax.device_put(
        jnp.array([0.5, 1.5, 2.5, -1.0]), jax.sharding.NamedSharding(mesh, spec)
    )
    scale = jnp.array(1.1)
    assert_tree_allclose(jax.jit(sharded)(scale, x), reference(scale, x))
    tangents = (jnp.array(0.3), jnp.ones(4))
    assert_tree_allclose(
        jax.jit(lambda s, y: jax.jvp(sharded, (s, y), tangents))(scale, x),
        jax.jvp(reference, (scale, x), tangents),
    )
    batch = jnp.stack([x, 2 * x])
    assert_tree_allclose(
        jax.jit(jax.vmap(sharded, in_axes=(None, 0)))(scale, batch),
        jax.vmap(reference, in_axes=(None, 0))(scale, batch),
    )
    if loop != "lax":  # Forward mode only.
        assert_tree_allclose(
            jax.jit(jax.grad(lambda s, y: loss(sharded, s, y), argnums=(0, 1)))(
                scale, x
            ),
            jax.grad(lambda s, y: loss(reference, s, y), argnums=(0, 1))(scale, x),
            rtol=2e-4,
            atol=2e-5,
        )
