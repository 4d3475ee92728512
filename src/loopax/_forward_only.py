"""Mark values as forward-mode only, so reverse mode fails with *our* error message.

`lax.while_loop` supports `jvp` but not `grad`. When a user differentiates a
`kind="lax"` loop in reverse mode, JAX's own error talks about `lax.while_loop` and
`lax.scan`; ours should name the loopax kinds that do support reverse mode. So the
backend passes every differentiable input of the loop (the initial value and the
body's closed-over arrays) through `forward_only`: an identity whose tangent is also
passed through it, and whose partial-evaluation rule raises the given message when a
tangent is *unknown* — which is exactly the moment reverse mode (`jax.linearize`,
`jax.vjp`, `jax.grad`) starts splitting the loop into a primal and a linear part.
Pure forward mode (`jax.jvp`, `jax.jacfwd`) never partially evaluates, so it is
unaffected, and the marker lowers to nothing.
"""

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._jax_internals import define_primitive, is_known, is_zero, stage_primitive


def _forward_only_jvp(primals, tangents, *, message):
    (x,), (t,) = primals, tangents
    if not is_zero(t):
        t = forward_only_p.bind(t, message=message)
    return forward_only_p.bind(x, message=message), t


def _forward_only_batch(args, dims, *, message):
    (x,), (dim,) = args, dims
    return forward_only_p.bind(x, message=message), dim


def _forward_only_partial_eval(trace, tracer, *, message):
    if not is_known(tracer):
        raise ValueError(message)
    return stage_primitive(trace, forward_only_p, (tracer,), dict(message=message))


forward_only_p = define_primitive(
    "loopax_forward_only",
    impl=lambda x, *, message: x,
    abstract_eval=lambda x, *, message: x,
    jvp=_forward_only_jvp,
    batch=_forward_only_batch,
    partial_eval=_forward_only_partial_eval,
)


def forward_only(tree: PyTree, message: str) -> PyTree:
    """Mark the floating-point arrays of `tree`: reverse mode through them raises
    `message`."""

    def mark(x):
        return forward_only_p.bind(x, message=message) if eqx.is_inexact_array(x) else x

    return jtu.tree_map(mark, tree)
