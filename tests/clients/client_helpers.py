"""Shared fixtures for the client tests: run Diffrax / Optimistix on loopax's loop.

Diffrax and Optimistix reach Equinox's loop through two kinds of hook:

- `equinox.internal.while_loop`, looked up as a module attribute at call time
  (Diffrax's Runge-Kutta stage loop, Optimistix's adjoints, Lineax's GMRES);
- `diffrax._adjoint._inner_loop` / `_outer_loop`, bound once at import as
  `jax.named_call(eqxi.while_loop, name=...)` (Diffrax's step loop and its `SaveAt(ts=...)`
  loop).

`loopax_underneath` replaces all of them by a counting wrapper around `loopax.while_loop`
and restores them afterwards. It clears JAX's caches on entry and exit: `diffeqsolve` is
jitted, and a trace cached by the other run would silently bypass the swap (the call
counter catches that too).
"""

import contextlib
import importlib
from collections import Counter

import equinox.internal as eqxi
import jax
import numpy as np

import loopax


class LoopSpy:
    """Counts the loops that ran on loopax, by kind and by the keywords they passed."""

    def __init__(self):
        self.kinds = Counter()
        self.keywords = set()

    @property
    def calls(self) -> int:
        return sum(self.kinds.values())

    def __call__(self, cond_fun, body_fun, init_val, **kwargs):
        self.kinds[kwargs.get("kind", "checkpointed")] += 1
        self.keywords.update(kwargs)
        return loopax.while_loop(cond_fun, body_fun, init_val, **kwargs)


@contextlib.contextmanager
def swap_loops(*, buffer_at_set: bool = False):
    """Within the block, the clients' loops are `loopax.while_loop`; yields a `LoopSpy`.

    With `buffer_at_set=True`, `equinox.internal.buffer_at_set` is swapped for
    `loopax.buffer_at_set` too; by default Diffrax's calls of Equinox's `buffer_at_set`
    on loopax `Buffer`s take Equinox's fallback path (`.at[i].get()`, `.at[i].set(x)`).
    """
    spy = LoopSpy()
    patches = [(eqxi, "while_loop", spy)]
    if buffer_at_set:
        patches.append((eqxi, "buffer_at_set", loopax.buffer_at_set))
    try:
        adjoint = importlib.import_module("diffrax._adjoint")
    except ImportError:
        pass
    else:
        patches += [
            (adjoint, "_inner_loop", jax.named_call(spy, name="inner-loop")),
            (adjoint, "_outer_loop", jax.named_call(spy, name="outer-loop")),
        ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    jax.clear_caches()
    try:
        for module, name, new in patches:
            setattr(module, name, new)
        yield spy
    finally:
        for module, name, old in saved:
            setattr(module, name, old)
        jax.clear_caches()


def assert_close(x, y, *, rtol, atol, what=""):
    """Leaf-wise `np.testing.assert_allclose` of two pytrees (same structure)."""
    xs, xdef = jax.tree_util.tree_flatten(x)
    ys, ydef = jax.tree_util.tree_flatten(y)
    assert xdef == ydef, f"{what}: structures differ: {xdef} != {ydef}"
    for a, b in zip(xs, ys, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)
