"""The one seam between loopax and JAX's internals.

loopax defines its own primitives (the checkpointed loop, buffer writes, the vmap
and forward-only markers), and a primitive needs rules that JAX's documented API
does not cover: rule registries, jaxpr manipulation, partial-evaluation tracers and
the varying mesh axes of an aval inside `shard_map`. Everything loopax takes from
JAX outside its documented API is imported or touched here and nowhere else (a test,
`tests/test_jax_seam.py`, enforces it), and every difference between the JAX
versions loopax admits is handled here. The rest of the package speaks public JAX
plus the small vocabulary below.

Public aliases are preferred where they exist (`jax.extend.core`,
`jax.interpreters.*`); `jax._src` is reached only for names with no public alias
(`jvp_jaxpr` on the oldest JAX, `partial_eval_jaxpr_nounits`, `batch_jaxpr`).

Version differences handled here (see `docs/support.md` for the policy):

- JAX >= 0.11 calls dead-code-elimination rules as `rule(used_outputs, live_inputs,
  eqn)`; JAX 0.10 as `rule(used_outputs, eqn)`. `define_primitive(dce=...)` takes a
  rule of the second form and adapts it.
- JAX >= 0.11 merged `ClosedJaxpr` into `Jaxpr` (a jaxpr carries its constants);
  `ClosedJaxpr(jaxpr, consts)` still builds one on both, and `open_jaxpr` gives the
  jaxpr whose equations and variables to read on both.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
from jax import lax
from jax._src.interpreters import (
    ad as _ad_internal,
    batching as _batching_internal,
    partial_eval as _pe_internal,
)
from jax._src.lax import lax as _lax_internal
from jax.core import ShapedArray
from jax.interpreters import ad as _ad, batching as _batching, mlir as _mlir


JAX_VERSION: tuple[int, ...] = tuple(
    int(p) for p in jax.__version__.split(".")[:3] if p.isdigit()
)
# JAX 0.11 passed DCE rules the liveness of Ref inputs as an extra argument.
_DCE_RULES_TAKE_LIVE_INPUTS = JAX_VERSION >= (0, 11)

# -- jaxprs -----------------------------------------------------------------------

ClosedJaxpr = jex_core.ClosedJaxpr
Jaxpr = jex_core.Jaxpr
JaxprEqn = jex_core.JaxprEqn
Primitive = jex_core.Primitive
Var = jex_core.Var
jaxpr_as_fun = jex_core.jaxpr_as_fun
new_jaxpr_eqn = jex_core.new_jaxpr_eqn


def open_jaxpr(jaxpr: ClosedJaxpr) -> Any:
    """The jaxpr whose `invars`, `outvars` and `eqns` to read (on JAX >= 0.11 a
    closed jaxpr is its own open jaxpr)."""
    return jaxpr.jaxpr


def with_consts(jaxpr: ClosedJaxpr, consts: Sequence[Any]) -> ClosedJaxpr:
    """`jaxpr` with other values (e.g. tracers) for its constants."""
    return ClosedJaxpr(open_jaxpr(jaxpr), list(consts))


def map_eqns(
    jaxpr: ClosedJaxpr,
    rewrite: Callable[[Any, set], tuple[Any, bool]],
    *,
    inputs: Sequence[bool],
) -> ClosedJaxpr:
    """`jaxpr` with each top-level equation replaced by `rewrite(eqn, tracked)`.

    `tracked` is the set of variables reachable from the inputs marked in `inputs`
    through equations `rewrite` chose to track (it returns `(new_eqn, track)`; with
    `track` true, the equation's first output joins the set)."""
    inner = open_jaxpr(jaxpr)
    tracked = {v for v, mark in zip(inner.invars, inputs, strict=True) if mark}
    eqns = []
    for eqn in inner.eqns:
        new_eqn, track = rewrite(eqn, tracked)
        if track:
            tracked.add(new_eqn.outvars[0])
        eqns.append(new_eqn)
    return ClosedJaxpr(inner.replace(eqns=eqns), jaxpr.consts)


def eqn_with_params(eqn: Any, **params) -> Any:
    """`eqn` with some of its parameters replaced."""
    return eqn.replace(params={**eqn.params, **params})


def forwarded_inputs(jaxpr: ClosedJaxpr, outputs: slice, num_inputs: int) -> tuple:
    """For each output of `jaxpr` in `outputs`: the index among its first
    `num_inputs` inputs of the input it returns unchanged, or -1."""
    inner = open_jaxpr(jaxpr)
    candidates = inner.invars[:num_inputs]
    return tuple(
        next((i for i, v in enumerate(candidates) if v is out), -1)
        for out in inner.outvars[outputs]
    )


def is_var(x: Any) -> bool:
    """Whether an equation input is a variable (not a literal)."""
    return type(x) is Var


def eqn_like(eqn: Any, invars, outvars, params, effects) -> Any:
    """A new equation of `eqn`'s primitive, source location and context."""
    return new_jaxpr_eqn(
        list(invars),
        list(outvars),
        eqn.primitive,
        params,
        effects,
        eqn.source_info,
        eqn.ctx,
    )


def dce_jaxpr(jaxpr: ClosedJaxpr, used_outputs: Sequence[bool]) -> ClosedJaxpr:
    """`jaxpr` restricted to `used_outputs`, dead code removed, all inputs kept."""
    dced, _ = _pe_internal.dce_jaxpr(
        open_jaxpr(jaxpr), list(used_outputs), instantiate=True
    )
    return ClosedJaxpr(dced, jaxpr.consts)


def partial_eval_jaxpr(
    jaxpr: ClosedJaxpr, unknowns: Sequence[bool], instantiate: bool | Sequence[bool]
) -> tuple[ClosedJaxpr, ClosedJaxpr, list[bool]]:
    """Split `jaxpr` into the part computable from the known inputs and the rest:
    `(known, unknown, out_unknowns)` (JAX's `partial_eval_jaxpr_nounits`)."""
    known, unknown, out_uk, _ = _pe_internal.partial_eval_jaxpr_nounits(
        jaxpr, list(unknowns), instantiate=instantiate
    )
    return known, unknown, list(out_uk)


def jvp_jaxpr(
    jaxpr: ClosedJaxpr, nonzeros: Sequence[bool], instantiate: bool | Sequence[bool]
) -> tuple[ClosedJaxpr, list[bool]]:
    """The jvp of `jaxpr`: `(primals, nonzero tangents) -> (primal outputs, nonzero
    tangent outputs)`, and which tangent outputs are nonzero."""
    out, out_nz = _ad_internal.jvp_jaxpr(jaxpr, list(nonzeros), instantiate)
    return out, list(out_nz)


def batch_jaxpr(
    jaxpr: ClosedJaxpr, axis_data: Any, batched: Sequence[bool], instantiate: Any
) -> tuple[ClosedJaxpr, list[bool]]:
    """`jaxpr` vmapped over the inputs marked `batched` (axis 0), and which outputs
    are batched."""
    out, out_b = _batching_internal.batch_jaxpr(
        jaxpr, axis_data, list(batched), instantiate
    )
    return out, list(out_b)


def broadcast_batched(x: Any, axis_data: Any) -> Any:
    """Unbatched `x` given a leading batch axis of `axis_data`'s size."""
    return _batching.broadcast(x, axis_data.size, 0, None)


# -- avals ------------------------------------------------------------------------


def varying_axes(aval: Any) -> tuple[str, ...]:
    """The `shard_map` mesh axes a value of type `aval` varies over (sorted)."""
    mat = getattr(aval, "mat", None)
    if mat is None or mat.empty:
        return ()
    return tuple(sorted(mat.varying))


def shape_struct(aval: Any) -> jax.ShapeDtypeStruct:
    """A `ShapeDtypeStruct` of `aval`'s shape and dtype, and inside `shard_map` of the
    mesh axes it varies over (its manual axis type), so jaxprs traced from it
    type-check there."""
    mat = getattr(aval, "mat", None)
    if mat is None or mat.empty:
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, sharding=aval.sharding, manual_axis_type=mat
    )


def zeros(aval: Any, rows: tuple[int, ...] = ()) -> jax.Array:
    """Zeros of `aval`'s shape (after `rows` leading dimensions) and dtype, varying
    over the same `shard_map` mesh axes as `aval`, so that loops and conds that mix
    them with values of that type type-check under `check_vma=True`."""
    out = jnp.zeros((*rows, *aval.shape), aval.dtype)
    axes = varying_axes(aval)
    if axes:
        out = lax.pcast(out, axes, to="varying")
    return out


def stacked_aval(num_rows: int, aval: Any) -> Any:
    """The aval of `num_rows` values of type `aval` stacked along a new axis 0
    (keeping the varying mesh axes)."""
    return jex_core.unmapped_aval(num_rows, 0, aval)


def is_weakly_typed(x: Any) -> bool:
    """Whether `x` (an array, tracer, Python scalar or `jax.ShapeDtypeStruct`) is weakly
    typed."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return bool(x.weak_type)
    return bool(jax.typeof(x).weak_type)


def with_weak_type(x: Any, weak: bool) -> Any:
    """`x` (an array or tracer) with its weak type set to `weak`, value and dtype
    unchanged (JAX has no public way to make an array weakly typed)."""
    if is_weakly_typed(x) == weak:
        return x
    return _lax_internal._convert_element_type(x, weak_type=weak)


def strong_aval(aval: Any) -> Any:
    """`aval` without its weak type."""
    return aval.update(weak_type=False)


def row_aval(aval: Any) -> Any:
    """The aval of one row of a stacked `aval`."""
    return aval.update(shape=aval.shape[1:])


def int32_vector_aval(size: int) -> Any:
    return ShapedArray((size,), jnp.int32)


def tangent_aval(aval: Any) -> Any:
    return aval.to_tangent_aval()


# -- automatic differentiation ----------------------------------------------------

Zero = _ad.Zero
instantiate_zeros = _ad.instantiate_zeros
is_undefined_primal = _ad.is_undefined_primal


def is_zero(tangent: Any) -> bool:
    """Whether `tangent` is JAX's symbolic zero."""
    return type(tangent) is _ad.Zero


def zero_like(x: Any) -> Any:
    """The symbolic zero tangent of `x`."""
    return _ad.Zero(jax.typeof(x).to_tangent_aval())


def undefined_or_value_aval(x: Any) -> Any:
    """In a transpose rule: the aval of a linear input, or of a known value."""
    return x.aval if _ad.is_undefined_primal(x) else jax.typeof(x)


# -- partial evaluation tracers ---------------------------------------------------


def is_known(tracer: Any) -> bool:
    """In a partial-evaluation rule: whether `tracer`'s value is known."""
    return tracer.pval.is_known()


def known_value(tracer: Any) -> Any:
    return tracer.pval.get_known()


def stage_unknown(trace: Any, tracer: Any) -> Any:
    """`tracer` as an unknown input of a staged equation."""
    return trace.instantiate_const(trace.to_jaxpr_tracer(tracer))


def stage_known(trace: Any, value: Any) -> Any:
    """A known `value` as an input (a residual) of a staged equation."""
    return trace.new_instantiated_const(value)


def stage_primitive(trace: Any, primitive: Primitive, tracers, params) -> Any:
    """Stage `primitive` as one unknown equation (JAX's default partial eval)."""
    return trace.default_process_primitive(primitive, tracers, params)


# -- defining primitives ----------------------------------------------------------


def define_primitive(
    name: str,
    *,
    impl: Callable,
    abstract_eval: Callable | None = None,
    effectful_abstract_eval: Callable | None = None,
    multiple_results: bool = False,
    jvp: Callable | None = None,
    transpose: Callable | None = None,
    batch: Callable | None = None,
    batch_with_axis_data: Callable | None = None,
    partial_eval: Callable | None = None,
    partial_eval_custom: Callable | None = None,
    dce: Callable[[list[bool], Any], tuple[list[bool], Any]] | None = None,
) -> Primitive:
    """A new primitive with its rules, all registered in one place.

    - `impl`: evaluation, also used as the lowering (`mlir.lower_fun`);
    - `jvp(primals, tangents, **params)`, `transpose(cts, *args, **params)`;
    - `batch(args, dims, **params)`, or `batch_with_axis_data(axis_data, args, dims,
      **params)` where the rule needs the batch size or spmd axis;
    - `partial_eval(trace, *tracers, **params)`: use `is_known`, `known_value`,
      `stage_known`, `stage_unknown`, `stage_primitive` on the tracers;
    - `partial_eval_custom(saveable, unks_in, inst_in, eqn)`: inside `jax.checkpoint`;
    - `dce(used_outputs, eqn) -> (used_inputs, new_eqn or None)`.
    """
    primitive = Primitive(name)
    primitive.multiple_results = multiple_results
    primitive.def_impl(impl)
    if effectful_abstract_eval is not None:
        primitive.def_effectful_abstract_eval(effectful_abstract_eval)
    else:
        assert abstract_eval is not None
        primitive.def_abstract_eval(abstract_eval)
    _mlir.register_lowering(
        primitive, _mlir.lower_fun(impl, multiple_results=multiple_results)
    )
    if jvp is not None:
        _ad.primitive_jvps[primitive] = jvp
    if transpose is not None:
        _ad.primitive_transposes[primitive] = transpose
    if batch is not None:
        _batching.primitive_batchers[primitive] = batch
    if batch_with_axis_data is not None:
        _batching.fancy_primitive_batchers[primitive] = batch_with_axis_data
    if partial_eval is not None:
        _pe_internal.custom_partial_eval_rules[primitive] = partial_eval
    if partial_eval_custom is not None:
        _pe_internal.partial_eval_jaxpr_custom_rules[primitive] = partial_eval_custom
    if dce is not None:
        _pe_internal.dce_rules[primitive] = _adapt_dce_rule(dce)
    return primitive


def register_partial_eval(
    primitive: Primitive, *, partial_eval: Callable, partial_eval_custom: Callable
) -> None:
    """Register the partial-evaluation rules of an existing primitive (for rules that
    must bind primitives defined after it)."""
    _pe_internal.custom_partial_eval_rules[primitive] = partial_eval
    _pe_internal.partial_eval_jaxpr_custom_rules[primitive] = partial_eval_custom


def _adapt_dce_rule(rule: Callable) -> Callable:
    if not _DCE_RULES_TAKE_LIVE_INPUTS:
        return rule

    def with_live_inputs(used_outputs, live_inputs, eqn):
        # loopax's primitives take no Refs, so the liveness of Ref inputs is moot.
        del live_inputs
        return rule(used_outputs, eqn)

    return with_live_inputs
