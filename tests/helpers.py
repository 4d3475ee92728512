"""Shared test utilities: tolerance comparison and independent reference loops."""

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array

import loopax


KINDS = ("lax", "checkpointed", "bounded")
REVERSE_KINDS = ("checkpointed", "bounded")

# A bound large enough for every trip count used in the tests, for the kinds that need
# one (`kind="bounded"` requires `max_steps`).
DEFAULT_BOUND = 64


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-6) -> bool:
    """Same structure, shapes and dtypes, and values within tolerance."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype == jax.dtypes.float0:
            continue
        if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
            return False
    return True


def assert_tree_allclose(x, y, **kwargs) -> None:
    """`assert tree_allclose(x, y)` with a readable message when it fails."""
    assert tree_allclose(x, y, **kwargs), f"trees differ:\n{x}\n!=\n{y}"


def loop_kwargs(kind, max_steps=None, **kwargs):
    """Keyword arguments for `loopax.while_loop(..., kind=kind)`; adds the bound that
    `kind="bounded"` requires when the test has none."""
    if max_steps is None and kind == "bounded":
        max_steps = DEFAULT_BOUND
    return dict(kind=kind, max_steps=max_steps, **kwargs)


def bounded_lax_loop(cond_fun, body_fun, init_val, max_steps=None):
    """`lax.while_loop` with at most `max_steps` body calls: the reference for
    `loopax.while_loop(..., max_steps=max_steps)`."""
    if max_steps is None:
        return lax.while_loop(cond_fun, body_fun, init_val)

    def cond(carry):
        step, value = carry
        return cond_fun(value) & (step < max_steps)

    def body(carry):
        step, value = carry
        return step + 1, body_fun(value)

    return lax.while_loop(cond, body, (jnp.array(0, jnp.int32), init_val))[1]


def python_loop(cond_fun, body_fun, init_val, max_steps=None):
    """The loop as plain Python, eagerly: the most independent reference."""
    value, step = jtu.tree_map(jnp.asarray, init_val), 0
    while bool(cond_fun(value)) and (max_steps is None or step < max_steps):
        value, step = body_fun(value), step + 1
    return value


def scan_reference_loop(cond_fun, body_fun, init_val, max_steps):
    """Full-storage reference: `lax.scan` over `max_steps` of `lax.cond`. Reverse-mode
    differentiable by plain JAX, independent of every loopax backend."""

    def step(carry, _):
        keep = cond_fun(carry)
        return lax.cond(keep, body_fun, lambda c: c, carry), None

    return lax.scan(step, init_val, None, length=max_steps)[0]


# A three-step toy loop, for tests about arguments and errors rather than results.


def toy_cond(c):
    return c[0] < 3


def toy_body(c):
    return c[0] + 1, c[1] * 2.0


def toy_init():
    return jnp.array(0), jnp.ones(3)


def toy_loop(**kwargs):
    """`loopax.while_loop` of the toy loop with `kwargs`."""
    return loopax.while_loop(toy_cond, toy_body, toy_init(), **kwargs)


class Pair(eqx.Module):
    """An `eqx.Module` node for carries."""

    a: Array
    b: Array


def mixed_carry(num_steps):
    """A carry with a leaf of every dtype loopax must preserve, and the counter."""
    return {
        "i": jnp.array(0, jnp.int32),
        "n": jnp.array(num_steps, jnp.int32),
        "half": jnp.arange(3, dtype=jnp.float16),
        "nested": (
            jnp.ones((2, 2), jnp.float32),
            [jnp.array([1 + 2j, -1j], jnp.complex64)],
        ),
        "flags": jnp.array([True, False]),
        "empty": jnp.zeros((0, 3), jnp.float32),
        "empty_int": jnp.zeros((2, 0), jnp.int32),
        "scalar": 1.5,
        "module": Pair(jnp.array(2.0), jnp.arange(2, dtype=jnp.int32)),
    }


def mixed_cond(c):
    return c["i"] < c["n"]


def mixed_body(c):
    (f32,), (c64,) = c["nested"][:1], c["nested"][1]
    return {
        "i": c["i"] + 1,
        "n": c["n"],
        "half": c["half"] * jnp.float16(1.5) + jnp.float16(0.25),
        "nested": (jnp.sin(f32) + 0.5, [c64 * (0.5 + 1j)]),
        "flags": ~c["flags"],
        "empty": c["empty"] + 1.0,
        "empty_int": c["empty_int"] * 2,
        "scalar": c["scalar"] * 2,
        "module": Pair(c["module"].a - 1.0, c["module"].b + c["i"]),
    }


# -- types: loopax gives exactly the dtypes and weak types of `jax.lax` ---------------


def type_signature(fn, *args):
    """`(dtype, shape, weak_type)` of every output leaf of `fn(*args)`, by tracing."""
    out = jax.eval_shape(fn, *args)
    return [(str(s.dtype), s.shape, bool(s.weak_type)) for s in jtu.tree_leaves(out)]


def _default_float():
    return jnp.result_type(float)


# `(cond_fun, body_fun, init_val)` loops whose types `lax` decides by its rules for
# weakly typed values: a Python scalar kept weak by the body, promoted to the body's
# bfloat16 or float32 (float64 in x64 is promoted to float32), a weak int, a strong
# init, a tuple mixing them, a weak init the body makes strong.
TYPE_CASES = {
    "weak-kept": (lambda c: c < 3, lambda c: c + 1, 1.0),
    "weak-to-bf16": (
        lambda c: c < 3,
        lambda c: (c + 1).astype(jnp.bfloat16),
        1.0,
    ),
    "weak-to-f32": (lambda c: c < 3, lambda c: c * jnp.float32(2), 1.0),
    "weak-int": (lambda c: c < 3, lambda c: c + 1, 0),
    "strong": (lambda c: c < 3, lambda c: c + 1, jnp.float32(1)),
    "tuple": (
        lambda c: c[0] < 3,
        lambda c: (c[0] + 1, c[1] * jnp.float16(2)),
        (0, 1.0),
    ),
    # A strong carry that the body replaces by a Python scalar: `lax` returns it weak.
    "strong-made-weak": (
        lambda c: c[0] < 3,
        lambda c: (c[0] + 1, 1.0),
        (jnp.int32(0), jnp.ones((), _default_float())),
    ),
    "weak-made-strong": (
        lambda c: c < 3,
        lambda c: c * jnp.ones((), _default_float()),
        1.0,
    ),
}


def type_mismatches(case) -> list[str]:
    """Every front end and kind whose output types differ from `jax.lax`'s for a case
    of `TYPE_CASES` (empty if none)."""
    cond_fun, body_fun, init = TYPE_CASES[case]

    def fori_body(i, c):
        return body_fun(c)

    def scan_body(c, x):
        return body_fun(c), body_fun(c)

    pairs = []
    for kind in KINDS:
        pairs += [
            (
                f"while_loop {kind}",
                lambda k=kind: loopax.while_loop(
                    cond_fun, body_fun, init, kind=k, max_steps=9
                ),
                lambda: lax.while_loop(cond_fun, body_fun, init),
            ),
            (
                f"fori_loop {kind}",
                lambda k=kind: loopax.fori_loop(0, 3, fori_body, init, kind=k),
                lambda: lax.fori_loop(0, 3, fori_body, init),
            ),
            (
                f"fori_loop traced {kind}",
                lambda k=kind: jax.jit(
                    lambda n: loopax.fori_loop(
                        0, n, fori_body, init, kind=k, max_steps=9
                    )
                )(3),
                lambda: jax.jit(lambda n: lax.fori_loop(0, n, fori_body, init))(3),
            ),
        ]
    for kind in ("lax", "checkpointed"):
        for length in (0, 3):
            pairs.append(
                (
                    f"scan {kind} length={length}",
                    lambda k=kind, n=length: loopax.scan(
                        scan_body, init, length=n, kind=k
                    ),
                    lambda n=length: lax.scan(scan_body, init, length=n),
                )
            )
    found = []
    for what, got, want in pairs:
        got, want = type_signature(got), type_signature(want)
        if got != want:
            found.append(f"{what}: {got} != lax's {want}")
    return found


def fori_index_type(fori_loop, lower, upper, **kwargs):
    """`(dtype, weak_type)` of the index that `fori_loop` gives its body."""
    seen = []

    def body(i, v):
        seen.append((str(i.dtype), bool(jax.typeof(i).weak_type)))
        return v

    jax.eval_shape(lambda: fori_loop(lower, upper, body, 0.0, **kwargs))
    return seen[-1]


FORI_BOUNDS = {
    "ints": (0, 3),
    "int16-and-int": (np.int16(0), 3),
    "int-and-int16": (0, np.int16(3)),
    "int16-arrays": (jnp.int16(0), jnp.int16(3)),
}
