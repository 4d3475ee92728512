"""The checkpointed loop as two JAX primitives, so that every transformation composes.

A `jax.custom_vjp` cannot be differentiated in forward mode, nor twice in reverse
mode. So, like JAX's own `while` and `scan`, the checkpointed loop is a primitive,
`loop_p`, with a rule for each transformation:

- **evaluation / lowering**: a plain `lax.while_loop` (with `record=True`, one that
  also stores checkpoints; with per-step outputs, one that also stacks them);
- **jvp**: one `loop_p` over the body's jvp, carrying primals and tangents together,
  so `jax.jvp` costs what `lax.while_loop`'s jvp costs;
- **partial evaluation** (the step that turns `jvp` into `linearize`, and so into
  `vjp`/`grad`): the known (primal) part of the loop runs as a *recording* `loop_p`,
  whose checkpoints are the residuals, and the unknown (tangent) part becomes a
  `linear_loop_p`; when every step can be stored (`store_all`), the recording loop
  stacks each step's linearization residuals instead, like `lax.scan`;
- **transpose** of `linear_loop_p`: the checkpointed backward sweep
  (`checkpointed_sweeps.py`), built from `loop_p`s itself so that it can be
  differentiated again (reverse-over-reverse) in bounded memory;
- **batching** (`vmap`): the batched body inside the same primitive.

`linear_loop_p`, evaluated forward (e.g. the function `jax.linearize` returns),
simply reruns the whole loop from its initial state.

The loop state's first leaf is always the int32 step counter (`LoopState.step`):
checkpoint schedules and per-step outputs are keyed on it.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax._src import core
from jax._src.interpreters import (
    ad as ad_internal,
    batching as batching_internal,
    partial_eval as pe,
)
from jax.core import ShapedArray
from jax.extend.core import ClosedJaxpr, Primitive, Var, jaxpr_as_fun, new_jaxpr_eqn
from jax.interpreters import ad, batching, mlir

from .._buffer import mark_read_once
from .checkpointed_sweeps import (
    checkpointed_backward,
    merge,
    output_rows,
    per_step_backward,
    per_step_forward,
    pick,
    plain_forward,
    recording_forward,
    zeros,
)


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about a checkpointed loop but its jaxprs.

    - `num_consts`: the loop's inputs start with this many constants (arrays the body
      and predicate close over), then the carry.
    - `is_buffer`: per carry leaf, whether it is a write-once buffer (never stored in
      checkpoints; the backward sweep reads its final value).
    - `written_through_buffers`: per carry leaf, whether the body may write it with
      buffer writes (this loop's buffers and outer loops'; see `_linear_transpose`).
    - `checkpoints`: the number of checkpoint slots.
    - `store_all`: every step can be stored (`checkpoints >= max_steps`): reverse
      mode stacks each step's residuals instead of checkpointing.
    - `max_steps`: the bound on the number of steps, or `None`.
    - `forward_slots`: for loops of known length, the precomputed slot of each step's
      state (see `revolve_forward_slots`), instead of the online rule.
    """

    num_consts: int
    is_buffer: tuple[bool, ...]
    written_through_buffers: tuple[bool, ...]
    checkpoints: int
    store_all: bool
    max_steps: int | None
    forward_slots: tuple[int, ...] | None

    @property
    def num_carry(self) -> int:
        return len(self.is_buffer)

    @property
    def is_stored(self) -> tuple[bool, ...]:
        return tuple(not b for b in self.is_buffer)

    def replace(self, **changes) -> "LoopSpec":
        return dataclasses.replace(self, **changes)


loop_p = Primitive("loopax_checkpointed_loop")
loop_p.multiple_results = True
linear_loop_p = Primitive("loopax_checkpointed_linear_loop")
linear_loop_p.multiple_results = True


# -- small jaxpr tools ----------------------------------------------------------------


def _call(jaxpr: ClosedJaxpr, *args) -> list:
    return list(jaxpr_as_fun(jaxpr)(*args))


def _shape_structs(avals: Sequence[Any]) -> list[jax.ShapeDtypeStruct]:
    """Shapes and dtypes, and inside `shard_map` which mesh axes a value varies
    over (its manual axis type), so jaxprs traced from them type-check there."""
    structs = []
    for a in avals:
        mat = getattr(a, "mat", None)
        if mat is None or mat.empty:
            structs.append(jax.ShapeDtypeStruct(a.shape, a.dtype))
        else:
            structs.append(
                jax.ShapeDtypeStruct(
                    a.shape, a.dtype, sharding=a.sharding, manual_axis_type=mat
                )
            )
    return structs


def _retrace(fn: Callable, in_avals: Sequence[Any]) -> ClosedJaxpr:
    """`fn` (flat list in, flat list out) as a closed jaxpr without closed-over
    tracers."""
    return jax.make_jaxpr(fn)(*_shape_structs(in_avals))


def _keep_outputs(jaxpr: ClosedJaxpr, keep: Sequence[bool]) -> ClosedJaxpr:
    """`jaxpr` restricted to the outputs in `keep`, with dead code removed (all inputs
    are kept)."""
    dced, _ = pe.dce_jaxpr(jaxpr.jaxpr, list(keep), instantiate=True)
    return ClosedJaxpr(dced, jaxpr.consts)


def _zero_like(x) -> ad.Zero:
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _instantiate(ct, aval) -> Any:
    if type(ct) is ad.Zero:
        return zeros(aval)
    return ct


def trace_loop(
    cond_fn: Callable[[list], Any],
    body_fn: Callable[[list], list],
    init: Sequence[Any],
) -> tuple[list, ClosedJaxpr, ClosedJaxpr]:
    """Trace `cond_fn` and `body_fn` (flat carry in, flat carry out) into jaxprs that
    take `(*consts, *carry)`; returns `(consts, body, cond)`.

    Values the functions close over (weights, outer loops' tracers) become explicit
    constants, so they get cotangents and never leak out as closed-over tracers."""
    avals = [jax.typeof(x) for x in init]
    structs = _shape_structs(avals)
    body = jax.make_jaxpr(lambda *c: list(body_fn(list(c))))(*structs)
    cond = jax.make_jaxpr(lambda *c: [cond_fn(list(c))])(*structs)
    consts = [*body.consts, *cond.consts]
    nb = len(body.consts)
    const_avals = [jax.typeof(c) for c in consts]
    in_avals = [*const_avals, *avals]

    def body_all(*args):
        return _call(ClosedJaxpr(body.jaxpr, args[:nb]), *args[len(consts) :])

    def cond_all(*args):
        return _call(
            ClosedJaxpr(cond.jaxpr, args[nb : len(consts)]), *args[len(consts) :]
        )

    return consts, _retrace(body_all, in_avals), _retrace(cond_all, in_avals)


def bind_loop(
    cond_fn: Callable[[list], Any],
    body_fn: Callable[[list], list],
    init: Sequence[Any],
    *,
    is_buffer: Sequence[bool] | None = None,
    written_through_buffers: Sequence[bool] | None = None,
    checkpoints: int,
    store_all: bool = False,
    max_steps: int | None = None,
    forward_slots: Sequence[int] | None = None,
) -> list:
    """Run a flat-carry loop (first leaf: an int32 step counter) as `loop_p`."""
    consts, body, cond = trace_loop(cond_fn, body_fn, init)
    spec = LoopSpec(
        num_consts=len(consts),
        is_buffer=tuple(is_buffer or (False,) * len(init)),
        written_through_buffers=tuple(written_through_buffers or (False,) * len(init)),
        checkpoints=checkpoints,
        store_all=store_all,
        max_steps=max_steps,
        forward_slots=None if forward_slots is None else tuple(forward_slots),
    )
    return loop_p.bind(*consts, *init, body=body, cond=cond, spec=spec, record=False)


def differentiable_while_loop(checkpoints: int):
    """A `lax.while_loop` look-alike built on `loop_p` (with `checkpoints` slots), for
    the loops of the backward sweeps: differentiable again in reverse mode."""

    def while_loop(cond_fn, body_fn, init):
        leaves, treedef = jax.tree.flatten(init)
        # loop_p keys its schedules on a leading step counter.
        out = bind_loop(
            lambda c: cond_fn(jax.tree.unflatten(treedef, c[1:])),
            lambda c: [
                c[0] + 1,
                *jax.tree.leaves(body_fn(jax.tree.unflatten(treedef, c[1:]))),
            ],
            [jnp.int32(0), *leaves],
            checkpoints=checkpoints,
        )
        return jax.tree.unflatten(treedef, out[1:])

    return while_loop


# -- loop_p: shapes and evaluation ----------------------------------------------------


def _loop_out_avals(body: ClosedJaxpr, spec: LoopSpec, record: bool) -> list:
    carry = body.out_avals[: spec.num_carry]
    ys = body.out_avals[spec.num_carry :]
    # `update` and `unmapped_aval` keep the `shard_map` varying axes of the values.
    out = [a.update(weak_type=False) for a in carry]
    out += [core.unmapped_aval(output_rows(spec.max_steps), 0, a) for a in ys]
    if record:
        out += [
            core.unmapped_aval(spec.checkpoints, 0, a)
            for a in pick(carry, spec.is_stored)
        ]
        out.append(ShapedArray((spec.checkpoints,), jnp.int32))
    return out


def _loop_abstract_eval(*avals, body, cond, spec, record):
    del avals
    return _loop_out_avals(body, spec, record), body.effects | cond.effects


def _loop_impl(*args, body, cond, spec, record):
    consts, init = list(args[: spec.num_consts]), list(args[spec.num_consts :])
    n = spec.num_carry

    def step(carry):
        outs = _call(body, *consts, *carry)
        return outs[:n], outs[n:]

    def keep_going(carry):
        return _call(cond, *consts, *carry)[0]

    ys_avals = body.out_avals[n:]
    if record:
        final, stack, slot_pos, ys = recording_forward(
            step,
            keep_going,
            init,
            spec.is_stored,
            spec.checkpoints,
            spec.forward_slots,
            spec.max_steps,
            ys_avals,
        )
        return [*final, *ys, *stack, slot_pos]
    if ys_avals:
        final, stacks = per_step_forward(
            step, keep_going, init, ys_avals, output_rows(spec.max_steps)
        )
        return [*final, *stacks]
    return plain_forward(step, keep_going, init)


loop_p.def_impl(_loop_impl)
loop_p.def_effectful_abstract_eval(_loop_abstract_eval)
mlir.register_lowering(loop_p, mlir.lower_fun(_loop_impl, multiple_results=True))


def _loop_dce(used_outputs: list[bool], eqn) -> tuple[list[bool], Any]:
    """Dead-code elimination: per-step outputs nobody uses are not computed.

    They never feed the carry, so dropping them is always valid. XLA would remove
    them from a single `while` loop itself, but not from the nested loops of the
    recording forward sweep (e.g. the primal outputs of a `loopax.scan` under
    `jax.grad`, which are discarded). Carry leaves are kept: a loop's carry is
    needed for its own length and checkpoints."""
    body, spec = eqn.params["body"], eqn.params["spec"]
    n = spec.num_carry
    num_ys = len(body.out_avals) - n
    ys_used = used_outputs[n : n + num_ys]
    if not any(used_outputs) and not (body.effects or eqn.params["cond"].effects):
        return [False] * len(eqn.invars), None
    if all(ys_used):
        return [True] * len(eqn.invars), eqn
    keep = [True] * n + list(ys_used)
    keep_outvars = keep + [True] * (len(eqn.outvars) - n - num_ys)
    new_eqn = new_jaxpr_eqn(
        eqn.invars,
        [v for v, k in zip(eqn.outvars, keep_outvars, strict=True) if k],
        loop_p,
        dict(eqn.params, body=_keep_outputs(body, keep)),
        eqn.effects,
        eqn.source_info,
        eqn.ctx,
    )
    return [True] * len(eqn.invars), new_eqn


pe.dce_rules[loop_p] = _loop_dce


# -- loop_p: jvp ----------------------------------------------------------------------


def _loop_jvp(primals, tangents, *, body, cond, spec, record):
    nc, n = spec.num_consts, spec.num_carry
    ny = len(body.out_avals) - n
    nonzero = [type(t) is not ad.Zero for t in tangents]
    const_nz, carry_nz = nonzero[:nc], nonzero[nc:]
    while True:
        body_jvp, out_nz = ad_internal.jvp_jaxpr(
            body, const_nz + carry_nz, instantiate=carry_nz + [False] * ny
        )
        grown = [a or b for a, b in zip(carry_nz, out_nz[:n], strict=True)]
        if grown == carry_nz:
            break
        carry_nz = grown
    ys_nz = out_nz[n:]
    n_tc, n_tx, n_ty = sum(const_nz), sum(carry_nz), sum(ys_nz)

    # jvp jaxpr: (consts, carry, const tangents, carry tangents)
    #         -> (carry, ys, carry tangents, ys tangents).
    # The joint loop wants (consts, const tangents, carry, carry tangents)
    #                   -> (carry, carry tangents, ys, ys tangents).
    def joint_body(*args):
        c, tc, x, tx = _split(args, [nc, n_tc, n])
        outs = _call(body_jvp, *c, *x, *tc, *tx)
        y_x, y_y, y_tx, y_ty = _split(outs, [n, ny, n_tx])
        return [*y_x, *y_tx, *y_y, *y_ty]

    def joint_cond(*args):
        c, _, x, _ = _split(args, [nc, n_tc, n])
        return _call(cond, *c, *x)

    consts, init = primals[:nc], primals[nc:]
    in_avals = [jax.typeof(p) for p in primals]
    joint_avals = [
        *in_avals[:nc],
        *[a.to_tangent_aval() for a in pick(in_avals[:nc], const_nz)],
        *in_avals[nc:],
        *[a.to_tangent_aval() for a in pick(in_avals[nc:], carry_nz)],
    ]
    joint_spec = spec.replace(
        num_consts=nc + n_tc,
        is_buffer=spec.is_buffer + tuple(pick(spec.is_buffer, carry_nz)),
        written_through_buffers=spec.written_through_buffers
        + tuple(pick(spec.written_through_buffers, carry_nz)),
    )
    t_consts = [ad.instantiate_zeros(t) for t in pick(tangents[:nc], const_nz)]
    t_init = [ad.instantiate_zeros(t) for t in pick(tangents[nc:], carry_nz)]
    outs = loop_p.bind(
        *consts,
        *t_consts,
        *init,
        *t_init,
        body=_retrace(joint_body, joint_avals),
        cond=_retrace(joint_cond, joint_avals),
        spec=joint_spec,
        record=record,
    )
    x, tx, y, ty, rest = _split(outs, [n, n_tx, ny, n_ty])
    primal_out = [*x, *y]
    tangent_out = [
        *_fill_zeros(carry_nz, tx, x),
        *_fill_zeros(ys_nz, ty, y),
    ]
    if record:
        n_stored = sum(spec.is_stored)
        stack, t_stack, (slot_pos,) = _split(rest, [n_stored, len(rest) - n_stored - 1])
        primal_out += [*stack, slot_pos]
        tangent_out += [
            *_fill_zeros(pick(carry_nz, spec.is_stored), t_stack, stack),
            _zero_like(slot_pos),
        ]
    return primal_out, tangent_out


def _split(xs: Sequence[Any], sizes: Sequence[int]) -> list[list]:
    """`xs` cut into consecutive pieces of `sizes`, plus the remainder."""
    out, start = [], 0
    for size in sizes:
        out.append(list(xs[start : start + size]))
        start += size
    out.append(list(xs[start:]))
    return out


def _fill_zeros(nonzero: Sequence[bool], values: Sequence[Any], like: Sequence[Any]):
    it = iter(values)
    return [
        next(it) if nz else _zero_like(p) for nz, p in zip(nonzero, like, strict=True)
    ]


ad.primitive_jvps[loop_p] = _loop_jvp


# -- loop_p: partial evaluation (known primal sweep + linear tangent loop) -------------


@dataclasses.dataclass(frozen=True)
class _Split:
    """How a loop was split into a known part and a linear (unknown) part.

    - `const_uk`, `carry_uk`, `ys_uk`: which constants, carry leaves and per-step
      outputs are unknown;
    - `known_body`: known constants and carry -> known carry, known per-step outputs
      and residuals; `unknown_body`: residuals, unknown constants and carry -> unknown
      carry and per-step outputs (linear in the unknowns);
    - `residual_const`: `store_all` only: per residual, the index of the known constant
      it is (not stacked), or -1 for a residual stacked per step.
    """

    const_uk: tuple[bool, ...]
    carry_uk: tuple[bool, ...]
    ys_uk: tuple[bool, ...]
    known_body: ClosedJaxpr
    unknown_body: ClosedJaxpr
    residual_const: tuple[int, ...]

    @property
    def num_known_carry(self) -> int:
        return self.carry_uk.count(False)

    @property
    def num_known_ys(self) -> int:
        return self.ys_uk.count(False)


def _split_body(
    body: ClosedJaxpr, const_uk: list[bool], carry_uk: list[bool]
) -> tuple[ClosedJaxpr, ClosedJaxpr, list[bool], list[bool]]:
    """Split `body` into known and unknown parts, growing the set of unknown carry
    leaves until it is a fixpoint (a leaf is unknown if the body makes it depend on
    an unknown). Returns the known and unknown bodies and which carry leaves and
    per-step outputs are unknown."""
    num_ys = len(body.out_avals) - len(carry_uk)
    while True:
        known, unknown, out_uk, _ = pe.partial_eval_jaxpr_nounits(
            body, const_uk + carry_uk, instantiate=carry_uk + [False] * num_ys
        )
        grown = [a or b for a, b in zip(carry_uk, out_uk, strict=False)]
        if grown == carry_uk:
            return known, unknown, carry_uk, list(out_uk[len(carry_uk) :])
        carry_uk = grown


class _KnownPart(NamedTuple):
    """The known part of a loop whose inputs are partly unknown (`_split_body`), and
    what a loop over it needs: its predicate and spec."""

    known_body: ClosedJaxpr
    unknown_body: ClosedJaxpr
    const_uk: list[bool]
    carry_uk: list[bool]
    ys_uk: list[bool]
    cond: ClosedJaxpr
    spec: LoopSpec
    # The loop's length depends on an unknown: nothing can be split off.
    splittable: bool

    @property
    def num_known(self) -> tuple[int, int]:
        """Known carry leaves and known per-step outputs."""
        return self.carry_uk.count(False), self.ys_uk.count(False)


def _known_part(
    body: ClosedJaxpr, cond: ClosedJaxpr, spec: LoopSpec, unknown: Sequence[bool]
) -> _KnownPart:
    const_uk = list(unknown[: spec.num_consts])
    known_body, unknown_body, carry_uk, ys_uk = _split_body(
        body, const_uk, list(unknown[spec.num_consts :])
    )
    cond_known, _, (cond_uk,), _ = pe.partial_eval_jaxpr_nounits(
        cond, const_uk + carry_uk, instantiate=False
    )
    cond_known = _keep_outputs(
        cond_known, [True] + [False] * (len(cond_known.out_avals) - 1)
    )
    known_spec = spec.replace(
        num_consts=const_uk.count(False),
        is_buffer=tuple(pick(spec.is_buffer, carry_uk, False)),
        written_through_buffers=tuple(
            pick(spec.written_through_buffers, carry_uk, False)
        ),
    )
    return _KnownPart(
        known_body,
        unknown_body,
        const_uk,
        carry_uk,
        ys_uk,
        cond_known,
        known_spec,
        splittable=not (cond_uk or carry_uk[0]),
    )


def _loop_partial_eval(trace, *tracers, body, cond, spec, record):
    params = dict(body=body, cond=cond, spec=spec, record=record)
    unknown = [not t.pval.is_known() for t in tracers]
    part = _known_part(body, cond, spec, unknown)
    const_uk, carry_uk, ys_uk = part.const_uk, part.carry_uk, part.ys_uk
    known_body = part.known_body
    if not any(unknown) or not part.splittable or all(const_uk + carry_uk):
        # Nothing known to split off (or the loop's length itself is unknown).
        return trace.default_process_primitive(loop_p, tracers, params)

    known_in = [
        t.pval.get_known()
        for t, uk in zip(tracers, const_uk + carry_uk, strict=True)
        if not uk
    ]
    known_consts, known_init = (
        known_in[: const_uk.count(False)],
        known_in[const_uk.count(False) :],
    )
    nk, nky = part.num_known
    if spec.store_all:
        # Like `lax.scan`: stack each step's residuals as per-step outputs, except
        # those that are known constants (e.g. weight matrices), which are passed
        # once. Nothing else is recorded.
        const_vars = known_body.jaxpr.invars[: len(known_consts)]
        residual_const = tuple(
            next((i for i, v in enumerate(const_vars) if v is r), -1)
            for r in known_body.jaxpr.outvars[nk + nky :]
        )
        stacked_residuals = [i < 0 for i in residual_const]
    else:
        # Record checkpoints; the residuals are recomputed from them.
        residual_const = ()
        stacked_residuals = [False] * (len(known_body.out_avals) - nk - nky)
    known_out = loop_p.bind(
        *known_consts,
        *known_init,
        body=_keep_outputs(known_body, [True] * (nk + nky) + stacked_residuals),
        cond=part.cond,
        spec=part.spec,
        record=not spec.store_all,
    )
    known_final, known_ys, recorded = _split(known_out, [nk, nky])

    split = _Split(
        const_uk=tuple(const_uk),
        carry_uk=tuple(carry_uk),
        ys_uk=tuple(ys_uk),
        known_body=known_body,
        unknown_body=part.unknown_body,
        residual_const=residual_const,
    )
    residuals = [*known_consts, *known_init, *known_final, *recorded]
    uk_tracers = [
        trace.instantiate_const(trace.to_jaxpr_tracer(t))
        for t, uk in zip(tracers, const_uk + carry_uk, strict=True)
        if uk
    ]
    linear_out = trace.default_process_primitive(
        linear_loop_p,
        [*map(trace.new_instantiated_const, residuals), *uk_tracers],
        dict(params, split=split),
    )
    lin_carry, lin_ys, lin_stack = _split(
        linear_out, [carry_uk.count(True), ys_uk.count(True)]
    )
    outs = [*merge(carry_uk, lin_carry, known_final), *merge(ys_uk, lin_ys, known_ys)]
    if record:
        known_stack, (slot_pos,) = recorded[:-1], recorded[-1:]
        outs += [
            *merge(pick(carry_uk, spec.is_stored), lin_stack, known_stack),
            slot_pos,
        ]
    return outs


pe.custom_partial_eval_rules[loop_p] = _loop_partial_eval


def _loop_partial_eval_custom(saveable, unks_in, inst_in, eqn):
    """Partial evaluation inside `jax.checkpoint` (remat): the known outputs come from
    a loop over the known part; the unknown ones from the whole loop, staged to be
    recomputed (the remat policy saves nothing inside a loop). When the staged loop
    is transposed, JAX partially evaluates it again with `_loop_partial_eval`, which
    splits it into the recording sweep and the linear loop."""
    del saveable
    body, cond, spec, record = (
        eqn.params[k] for k in ("body", "cond", "spec", "record")
    )
    part = _known_part(body, cond, spec, unks_in)
    out_uk = part.carry_uk + part.ys_uk
    if record:
        out_uk += pick(part.carry_uk, spec.is_stored) + [False]
    new_inst = [
        x
        for x, inst in zip(eqn.invars, inst_in, strict=True)
        if type(x) is Var and not inst
    ]
    if not part.splittable:
        return None, eqn, [True] * len(eqn.outvars), [True] * len(eqn.outvars), new_inst
    nk, nky = part.num_known
    stepping = _keep_outputs(
        part.known_body,
        [True] * (nk + nky) + [False] * (len(part.known_body.out_avals) - nk - nky),
    )
    params_known = dict(body=stepping, cond=part.cond, spec=part.spec, record=record)
    eqn_known = new_jaxpr_eqn(
        pick(eqn.invars, part.const_uk + part.carry_uk, False),
        pick(eqn.outvars, out_uk, False),
        loop_p,
        params_known,
        stepping.effects | part.cond.effects,
        eqn.source_info,
        eqn.ctx,
    )
    return eqn_known, eqn, out_uk, [True] * len(out_uk), new_inst


pe.partial_eval_jaxpr_custom_rules[loop_p] = _loop_partial_eval_custom


# -- linear_loop_p --------------------------------------------------------------------


def _linear_layout(spec: LoopSpec, split: _Split, record: bool) -> list[int]:
    """Sizes of the argument groups of `linear_loop_p`: known constants, known
    initial carry, known final carry, recorded residuals, unknown constants, unknown
    initial carry."""
    nkc = split.const_uk.count(False)
    nk = split.num_known_carry
    if spec.store_all:
        n_recorded = sum(i < 0 for i in split.residual_const)
    else:
        n_recorded = sum(pick(spec.is_stored, split.carry_uk, False)) + 1
    return [nkc, nk, nk, n_recorded, split.const_uk.count(True)]


def _unknown_outputs(outs: Sequence[Any], spec: LoopSpec, record: bool, split: _Split):
    """The outputs of the linear part, from the outputs of the whole loop."""
    n = spec.num_carry
    ny = len(outs) - n - (sum(spec.is_stored) + 1 if record else 0)
    carry, ys, stack = _split(outs, [n, ny])
    uk = [*pick(carry, split.carry_uk), *pick(ys, split.ys_uk)]
    if record:
        uk += pick(stack[:-1], pick(split.carry_uk, spec.is_stored))
    return uk


def _linear_abstract_eval(*avals, body, cond, spec, record, split):
    del avals
    outs = _loop_out_avals(body, spec, record)
    return _unknown_outputs(outs, spec, record, split), body.effects | cond.effects


def _linear_impl(*args, body, cond, spec, record, split):
    """Forward evaluation: rerun the whole loop from its initial state."""
    k_consts, k_init, _, _, u_consts, u_init = _split(
        args, _linear_layout(spec, split, record)
    )
    outs = loop_p.bind(
        *merge(split.const_uk, u_consts, k_consts),
        *merge(split.carry_uk, u_init, k_init),
        body=body,
        cond=cond,
        spec=spec,
        record=record,
    )
    return _unknown_outputs(outs, spec, record, split)


def _linear_transpose(cts, *args, body, cond, spec, record, split):
    del cond
    layout = _linear_layout(spec, split, record)
    k_consts, k_init, k_final, recorded, u_consts, u_init = _split(args, layout)
    out_avals = _unknown_outputs(
        _loop_out_avals(body, spec, record), spec, record, split
    )
    stack_ct_zero = [
        type(ct) is ad.Zero
        for ct in cts[len(cts) - _num_stack_outs(spec, record, split) :]
    ]
    n_uc = len(u_consts)
    n_ux = split.carry_uk.count(True)
    n_uy = split.ys_uk.count(True)
    ct_final, ct_ys, ct_stack = _split(cts, [n_ux, n_uy])
    final_avals, ys_avals, stack_avals = _split(out_avals, [n_ux, n_uy])
    ct_final = [_instantiate(c, a) for c, a in zip(ct_final, final_avals, strict=True)]
    ct_stack = [_instantiate(c, a) for c, a in zip(ct_stack, stack_avals, strict=True)]

    def ct_ys_row(k):
        """Step `k`'s row of the per-step outputs' cotangents (zeros, never a stack of
        zeros, for outputs without one)."""
        return [
            zeros(a.update(shape=a.shape[1:])) if type(ct) is ad.Zero else ct[k]
            for ct, a in zip(ct_ys, ys_avals, strict=True)
        ]

    u_const_avals = [_primal_aval(x) for x in u_consts]
    u_carry_avals = [_primal_aval(x) for x in u_init]
    ct_consts = [zeros(a) for a in u_const_avals]
    nk, nky = split.num_known_carry, split.num_known_ys

    # The body's writes into this loop's buffers may skip zeroing the written entries
    # of the cotangent (see `_buffer.py`) unless the cotangent of a written leaf's
    # initial value is asked for: by contract no earlier step reads those entries.
    written = pick(spec.written_through_buffers, split.carry_uk)
    unknown_body = split.unknown_body
    if not any(
        w and ad.is_undefined_primal(x) for w, x in zip(written, u_init, strict=True)
    ):
        num_residuals = len(unknown_body.in_avals) - n_uc - len(u_init)
        unknown_body = mark_read_once(
            unknown_body, [False] * (num_residuals + n_uc) + written
        )

    def transpose_unknown(residuals, ct_out):
        """Cotangents of the unknown constants and carry, given one step's residuals."""
        cts_in = jax.linear_transpose(
            lambda *lin: _call(unknown_body, *residuals, *lin),
            *_shape_structs(u_const_avals + u_carry_avals),
        )(ct_out)
        return list(cts_in[n_uc:]), list(cts_in[:n_uc])

    while_loop = differentiable_while_loop(spec.checkpoints)
    if spec.store_all:
        stacked = iter(recorded)
        residual_sources = [
            (k_consts[i], False) if i >= 0 else (next(stacked), True)
            for i in split.residual_const
        ]

        def transpose_stored_step(k, ct_state):
            residuals = [r[k] if per_step else r for r, per_step in residual_sources]
            return transpose_unknown(residuals, [*ct_state, *ct_ys_row(k)])

        ct_init, ct_consts = per_step_backward(
            while_loop=while_loop,
            transpose_step=transpose_stored_step,
            num_steps=k_final[0],
            ct_final=ct_final,
            ct_consts=ct_consts,
        )
    else:
        known_spec_stored = pick(spec.is_stored, split.carry_uk, False)
        advance_jaxpr = _keep_outputs(
            split.known_body,
            [True] * nk + [False] * (len(split.known_body.out_avals) - nk),
        )

        def advance(state):
            return _call(advance_jaxpr, *k_consts, *state)

        def transpose_step(state, ct_state, k):
            residuals = _call(split.known_body, *k_consts, *state)[nk + nky :]
            return transpose_unknown(residuals, [*ct_state, *ct_ys_row(k)])

        stack, slot_pos = recorded[:-1], recorded[-1]
        injection = None
        if record and not all(stack_ct_zero):
            injection = _stack_injection(
                pick(spec.is_stored, split.carry_uk),
                ct_stack,
                slot_pos,
            )
        ct_init, ct_consts = checkpointed_backward(
            while_loop=while_loop,
            advance=advance,
            transpose_step=transpose_step,
            is_stored=known_spec_stored,
            init=k_init,
            final=k_final,
            stack=stack,
            slot_pos=slot_pos,
            checkpoints=spec.checkpoints,
            ct_final=ct_final,
            ct_consts=ct_consts,
            stack_injection=injection,
            forward_slots=spec.forward_slots,
        )
    return [
        *[None] * sum(layout[:4]),
        *[
            ct if ad.is_undefined_primal(x) else None
            for x, ct in zip(u_consts, ct_consts, strict=True)
        ],
        *[
            ct if ad.is_undefined_primal(x) else None
            for x, ct in zip(u_init, ct_init, strict=True)
        ],
    ]


def _primal_aval(x):
    return x.aval if ad.is_undefined_primal(x) else jax.typeof(x)


def _num_stack_outs(spec: LoopSpec, record: bool, split: _Split) -> int:
    return sum(pick(split.carry_uk, spec.is_stored)) if record else 0


def _stack_injection(uk_is_stored, ct_stack, slot_pos):
    """When the recorded stack is itself an output being differentiated: the
    cotangent of slot `j` belongs to the state `x_{slot_pos[j]}`.

    `uk_is_stored`: over the unknown carry leaves, which are stored (those have a
    `ct_stack` entry, in order)."""

    def inject(k, ct_state):
        hit = slot_pos == k
        slot = jnp.argmax(hit)
        found = jnp.any(hit)
        stacked = iter(ct_stack)
        return [
            ct + jnp.where(found, next(stacked)[slot], jnp.zeros_like(ct))
            if stored
            else ct
            for ct, stored in zip(ct_state, uk_is_stored, strict=True)
        ]

    return inject


def _linear_jvp(primals, tangents, **params):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(lambda *a: _linear_impl(*a, **params), tuple(primals), tangents)


def _linear_batch(args, dims, **params):
    in_axes = [d for d in dims]
    outs = jax.vmap(lambda *a: _linear_impl(*a, **params), in_axes=in_axes)(*args)
    return outs, [0] * len(outs)


linear_loop_p.def_impl(_linear_impl)
linear_loop_p.def_effectful_abstract_eval(_linear_abstract_eval)
mlir.register_lowering(
    linear_loop_p, mlir.lower_fun(_linear_impl, multiple_results=True)
)
ad.primitive_jvps[linear_loop_p] = _linear_jvp
ad.primitive_transposes[linear_loop_p] = _linear_transpose
batching.primitive_batchers[linear_loop_p] = _linear_batch


# -- loop_p: batching -----------------------------------------------------------------


def _loop_batch(axis_data, args, dims, *, body, cond, spec, record):
    nc, n = spec.num_consts, spec.num_carry
    ny = len(body.out_avals) - n
    batched = [d is not None for d in dims]
    const_b, carry_b = batched[:nc], batched[nc:]
    while True:
        body_b, out_b = batching_internal.batch_jaxpr(
            body, axis_data, const_b + carry_b, instantiate=carry_b + [False] * ny
        )
        grown = [a or b for a, b in zip(carry_b, out_b[:n], strict=True)]
        if grown == carry_b:
            break
        carry_b = grown
    ys_b = out_b[n:]
    cond_b, (pred_b,) = batching_internal.batch_jaxpr(
        cond, axis_data, const_b + carry_b, instantiate=False
    )
    if pred_b:
        raise AssertionError(
            "loopax internal error: a checkpointed loop's predicate is batched; please "
            "report a bug."
        )
    new_args = []
    for x, d, want in zip(args, dims, const_b + carry_b, strict=True):
        if d is None:
            x = batching_internal.broadcast(x, axis_data.size, 0, None) if want else x
        else:
            x = jnp.moveaxis(x, d, 0)
        new_args.append(x)
    outs = loop_p.bind(*new_args, body=body_b, cond=cond_b, spec=spec, record=record)
    out_dims = [0 if b else None for b in carry_b] + [1 if b else None for b in ys_b]
    if record:
        out_dims += [1 if b else None for b in pick(carry_b, spec.is_stored)] + [None]
    return outs, out_dims


batching.fancy_primitive_batchers[loop_p] = _loop_batch


__all__ = ["LoopSpec", "bind_loop", "loop_p", "linear_loop_p", "trace_loop"]
