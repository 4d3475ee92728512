"""Mark values as forward-mode only, so reverse mode fails with *our* error message.

`lax.while_loop` supports `jvp` but not `grad`. When a user differentiates a
`kind="lax"` loop in reverse mode, JAX's own error talks about `lax.while_loop` and
`lax.scan`; ours should name the loopax kinds that do support reverse mode. So the
backend passes every differentiable input of the loop (the initial value and the
body's closed-over arrays) through `forward_only`: an identity whose tangent is also
passed through it, and whose *transpose* rule raises the given message. Forward mode
(`jax.jvp`, `jax.jacfwd`) and `jax.linearize` (which partially evaluates the loop, as
`lax.while_loop` allows, but transposes nothing) are unaffected, and the marker
lowers to nothing. Reverse mode (`jax.vjp`, `jax.grad`, `jax.jacrev`) transposes the
linear part: the backend marks the loop's outputs too, so the first transpose it
reaches is a marker's, before `lax.while_loop`'s own, and the error is ours. It is
raised when the gradient is traced (for `jax.vjp`, when its function is called).
"""

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._jax_internals import define_primitive, is_zero


def _forward_only_jvp(primals, tangents, *, message):
    (x,), (t,) = primals, tangents
    if not is_zero(t):
        t = forward_only_p.bind(t, message=message)
    return forward_only_p.bind(x, message=message), t


def _forward_only_batch(args, dims, *, message):
    (x,), (dim,) = args, dims
    return forward_only_p.bind(x, message=message), dim


def _forward_only_transpose(ct, x, *, message):
    del ct, x
    raise ValueError(message)


forward_only_p = define_primitive(
    "loopax_forward_only",
    impl=lambda x, *, message: x,
    abstract_eval=lambda x, *, message: x,
    jvp=_forward_only_jvp,
    batch=_forward_only_batch,
    transpose=_forward_only_transpose,
)


def forward_only(tree: PyTree, message: str) -> PyTree:
    """Mark the floating-point arrays of `tree`: reverse mode through them raises
    `message`."""

    def mark(x):
        return forward_only_p.bind(x, message=message) if eqx.is_inexact_array(x) else x

    return jtu.tree_map(mark, tree)
