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
import jax.core as _core
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


class CannotVary(Exception):
    """`eval_jaxpr_varying` met an equation it cannot retype (a nested control-flow
    primitive whose jaxprs were traced for less varying inputs)."""


def _is_pvary(primitive: Any) -> bool:
    return primitive.name == "pvary"


def _has_jaxpr_params(params: dict) -> bool:
    def is_jaxpr(v):
        return isinstance(v, (ClosedJaxpr, Jaxpr)) or (
            isinstance(v, (tuple, list)) and any(is_jaxpr(u) for u in v)
        )

    return any(is_jaxpr(v) for v in params.values())


def eval_jaxpr_varying(jaxpr: ClosedJaxpr, *args) -> list:
    """Evaluate `jaxpr` on `args` that may vary over more `shard_map` mesh axes than
    the jaxpr's inputs were traced with.

    A `pvary` of a value that already varies over its axes becomes the identity, and
    an equation whose inputs now disagree on their varying axes gets them `pcast` to
    the union first (as JAX's own `lax` functions do when tracing). Nested `jit`s are
    inlined. Raises `CannotVary` for other nested jaxprs (control flow) whose input
    types changed."""
    inner = open_jaxpr(jaxpr)
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for v, x in zip(inner.constvars, jaxpr.consts, strict=True):
        env[v] = x
    for v, x in zip(inner.invars, args, strict=True):
        env[v] = x
    for eqn in inner.eqns:
        invals = [read(v) for v in eqn.invars]
        if _is_pvary(eqn.primitive):
            (x,) = invals
            have = set(varying_axes(jax.typeof(x)))
            missing = tuple(a for a in eqn.params["axes"] if a not in have)
            outs = [lax.pcast(x, missing, to="varying") if missing else x]
        elif eqn.primitive.name in ("jit", "pjit"):
            outs = eval_jaxpr_varying(eqn.params["jaxpr"], *invals)
        else:
            got = [varying_axes(jax.typeof(x)) for x in invals]
            expected = [
                varying_axes(v.aval) if not isinstance(v, jex_core.Literal) else ()
                for v in eqn.invars
            ]
            if got != expected:
                if _has_jaxpr_params(eqn.params):
                    raise CannotVary(eqn.primitive.name)
                union = set().union(*got)
                invals = [
                    lax.pcast(x, tuple(sorted(union - set(g))), to="varying")
                    if union - set(g)
                    else x
                    for x, g in zip(invals, got, strict=True)
                ]
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns = []
            if isinstance(bind_params, tuple):  # Older JAX: (subfuns, params).
                subfuns, bind_params = bind_params
            outs = eqn.primitive.bind(*subfuns, *invals, **bind_params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex_core.DropVar):
                env[v] = x
    return [read(v) for v in inner.outvars]


def pvary_sources(jaxpr: ClosedJaxpr, inputs: Sequence[bool]) -> bool:
    """Whether a value computed from the inputs marked in `inputs` reaches a cast to
    varying (`pvary`) of an inexact value in `jaxpr`: the transpose of that cast is
    a `psum`, a collective. Nested calls (`jit`, `custom_jvp`, `cond` branches) are
    followed input by input; other nested jaxprs count as a whole."""
    inner = open_jaxpr(jaxpr)
    reached = {v for v, m in zip(inner.invars, inputs, strict=True) if m}

    def casts_anywhere(j) -> bool:
        j = open_jaxpr(j) if isinstance(j, ClosedJaxpr) else j
        for eqn in j.eqns:
            if _is_pvary(eqn.primitive) and _inexact(eqn.invars[0]):
                return True
            for v in eqn.params.values():
                for u in v if isinstance(v, (tuple, list)) else (v,):
                    if isinstance(u, (ClosedJaxpr, Jaxpr)) and casts_anywhere(u):
                        return True
        return False

    def closed(j) -> ClosedJaxpr:
        return j if isinstance(j, ClosedJaxpr) else ClosedJaxpr(j, [])

    for eqn in inner.eqns:
        marks = [is_var(v) and v in reached for v in eqn.invars]
        if not any(marks):
            continue
        if _is_pvary(eqn.primitive):
            if _inexact(eqn.invars[0]):
                return True
        elif (sub := eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))) is not None:
            if len(closed(sub).in_avals) == len(marks):
                if pvary_sources(closed(sub), marks):
                    return True
            elif casts_anywhere(sub):
                return True
        elif "branches" in eqn.params:
            if any(pvary_sources(closed(b), marks[1:]) for b in eqn.params["branches"]):
                return True
        elif any(
            isinstance(u, (ClosedJaxpr, Jaxpr)) and casts_anywhere(u)
            for v in eqn.params.values()
            for u in (v if isinstance(v, (tuple, list)) else (v,))
        ):
            return True
        reached.update(eqn.outvars)
    return False


def _inexact(v: Any) -> bool:
    return jnp.issubdtype(v.aval.dtype, jnp.inexact)


# -- avals ------------------------------------------------------------------------


def varying_axes(aval: Any) -> tuple[str, ...]:
    """The `shard_map` mesh axes a value of type `aval` varies over (sorted)."""
    mat = getattr(aval, "mat", None)
    if mat is None or mat.empty:
        return ()
    return tuple(sorted(mat.varying))


def explicit_sharding(aval: Any, rows: int = 0) -> Any:
    """The sharding of a value of type `aval` on a mesh with explicit axes, with
    `rows` unsharded leading dimensions prepended (for stacks of such values); `None`
    when no dimension is sharded over an explicit axis (automatic axes and
    `shard_map`'s manual axes are not part of the type)."""
    sharding = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is None or spec is None or all(p is None for p in spec):
        return None
    return jax.sharding.NamedSharding(
        sharding.mesh, jax.sharding.PartitionSpec(*(None,) * rows, *spec)
    )


def invariant_aval(aval: Any) -> Any:
    """`aval` without `shard_map` varying axes (the type of a value every device
    holds identically)."""
    mat = getattr(aval, "mat", None)
    if mat is None or mat.empty or not mat.varying:
        return aval
    return aval.update(manual_axis_type=mat.update(varying=frozenset()))


def is_tracer(x: Any) -> bool:
    """Whether `x` is a tracer (a value of a trace in progress), not a concrete array."""
    return isinstance(x, _core.Tracer)


def per_device_shape(x: Any) -> tuple[int, ...]:
    """The shape of the part of `x` (an array, a tracer or a `ShapeDtypeStruct`) one
    device holds, where its sharding is known at trace time: a committed array's or
    a `ShapeDtypeStruct`'s sharding, or a tracer's sharding over explicit mesh axes.
    (Inside `shard_map` shapes are per device already.) Otherwise its shape."""
    shape = tuple(jnp.shape(x))
    if isinstance(x, _core.Tracer):
        sharding = explicit_sharding(jax.typeof(x))
    else:
        sharding = getattr(x, "sharding", None)
    if sharding is None:
        return shape
    try:
        return tuple(sharding.shard_shape(shape))
    except Exception:  # e.g. a sharding that cannot tell its shard shape.
        return shape


def shape_struct(aval: Any) -> jax.ShapeDtypeStruct:
    """A `ShapeDtypeStruct` of `aval`'s shape and dtype, its sharding over explicit
    mesh axes, and inside `shard_map` the mesh axes it varies over (its manual axis
    type), so jaxprs traced from it type-check there."""
    mat = getattr(aval, "mat", None)
    if mat is None or mat.empty:
        return jax.ShapeDtypeStruct(
            aval.shape, aval.dtype, sharding=explicit_sharding(aval)
        )
    return jax.ShapeDtypeStruct(
        aval.shape, aval.dtype, sharding=aval.sharding, manual_axis_type=mat
    )


def zeros(aval: Any, rows: tuple[int, ...] = ()) -> jax.Array:
    """Zeros of `aval`'s shape (after `rows` leading dimensions) and dtype, with the
    same sharding over explicit mesh axes (the `rows` unsharded) and varying over the
    same `shard_map` mesh axes as `aval`, so that loops and conds that mix them with
    values of that type type-check."""
    out = jnp.zeros(
        (*rows, *aval.shape),
        aval.dtype,
        out_sharding=explicit_sharding(aval, len(rows)),
    )
    axes = varying_axes(aval)
    if axes:
        out = lax.pcast(out, axes, to="varying")
    return out


def row_struct(x: Any) -> jax.ShapeDtypeStruct:
    """A `ShapeDtypeStruct` of one row of `x` (its leading axis dropped), keeping its
    sharding over explicit mesh axes and its `shard_map` varying axes."""
    return shape_struct(row_aval(jax.typeof(x)))


def stacked_aval(num_rows: int, aval: Any) -> Any:
    """The aval of `num_rows` values of type `aval` stacked along a new axis 0
    (keeping the sharding and the varying mesh axes)."""
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
    sharding = getattr(aval, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if sharding is None or spec is None or len(spec) == 0:
        return aval.update(shape=aval.shape[1:])
    return aval.update(
        shape=aval.shape[1:],
        sharding=sharding.update(spec=jax.sharding.PartitionSpec(*spec[1:])),
    )


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
