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
from jax._src.interpreters import partial_eval as pe
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import PyTree


forward_only_p = Primitive("loopax_forward_only")
forward_only_p.def_impl(lambda x, *, message: x)
forward_only_p.def_abstract_eval(lambda x, *, message: x)
mlir.register_lowering(
    forward_only_p, mlir.lower_fun(lambda x, *, message: x, multiple_results=False)
)


def _forward_only_jvp(primals, tangents, *, message):
    (x,), (t,) = primals, tangents
    if type(t) is not ad.Zero:
        t = forward_only_p.bind(t, message=message)
    return forward_only_p.bind(x, message=message), t


def _forward_only_batch(args, dims, *, message):
    (x,), (dim,) = args, dims
    return forward_only_p.bind(x, message=message), dim


def _forward_only_partial_eval(trace, tracer, *, message):
    if not tracer.pval.is_known():
        raise ValueError(message)
    return trace.default_process_primitive(
        forward_only_p, (tracer,), dict(message=message)
    )


ad.primitive_jvps[forward_only_p] = _forward_only_jvp
batching.primitive_batchers[forward_only_p] = _forward_only_batch
pe.custom_partial_eval_rules[forward_only_p] = _forward_only_partial_eval


def forward_only(tree: PyTree, message: str) -> PyTree:
    """Mark the floating-point arrays of `tree`: reverse mode through them raises
    `message`."""

    def mark(x):
        return forward_only_p.bind(x, message=message) if eqx.is_inexact_array(x) else x

    return jtu.tree_map(mark, tree)
