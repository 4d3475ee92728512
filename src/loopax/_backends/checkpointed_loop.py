"""`loop_p`: the checkpointed loop as a JAX primitive, and its forward rules.

A `jax.custom_vjp` cannot be differentiated in forward mode, nor twice in reverse
mode. So, like JAX's own `while` and `scan`, the checkpointed loop is a primitive
with a rule for each transformation. This module holds the primitive and the rules
that need no reverse mode:

- **evaluation / lowering**: a plain `lax.while_loop` (with `record=True`, one that
  also stores checkpoints; with per-step outputs, one that also stacks them);
- **jvp**: one `loop_p` over the body's jvp, carrying primals and tangents together,
  so `jax.jvp` costs what `lax.while_loop`'s jvp costs;
- **batching** (`vmap`): the batched body inside the same primitive;
- **dead-code elimination** of unused per-step outputs.

Reverse mode lives in `checkpointed_split.py` (partial evaluation: the recording
primal sweep and `linear_loop_p`) and `checkpointed_linear.py` (`linear_loop_p` and
its transpose, the checkpointed backward sweep).

The loop state's first leaf is always the int32 step counter (`LoopState.step`):
checkpoint schedules and per-step outputs are keyed on it.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._devices import loop_axes, vary_consts
from .._jax_internals import (
    CannotVary,
    ClosedJaxpr,
    batch_jaxpr,
    broadcast_batched,
    dce_jaxpr as keep_outputs,
    define_primitive,
    eqn_like,
    eval_jaxpr_varying,
    instantiate_zeros,
    int32_vector_aval,
    is_zero,
    jaxpr_as_fun,
    jvp_jaxpr,
    shape_struct,
    stacked_aval,
    strong_aval,
    tangent_aval,
    varying_axes,
    with_consts,
    zero_like,
)
from .checkpointed_sweeps import (
    output_rows,
    per_step_forward,
    pick,
    plain_forward,
    recording_forward,
)


# A fixpoint over the carry leaves (which are unknown, nonzero, batched) grows by at
# least one leaf per round, so it ends within `num_carry + 1` rounds.
FIXPOINT_ERROR = (
    "loopax internal error: a fixpoint over the loop carry did not converge; please "
    "report a bug."
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


def call(jaxpr: ClosedJaxpr, *args) -> list:
    return list(jaxpr_as_fun(jaxpr)(*args))


def shape_structs(avals: Sequence[Any]) -> list[jax.ShapeDtypeStruct]:
    return [shape_struct(a) for a in avals]


def retrace(fn: Callable, in_avals: Sequence[Any]) -> ClosedJaxpr:
    """`fn` (flat list in, flat list out) as a closed jaxpr without closed-over
    tracers."""
    return jax.make_jaxpr(fn)(*shape_structs(in_avals))


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
    structs = shape_structs(avals)
    body = jax.make_jaxpr(lambda *c: list(body_fn(list(c))))(*structs)
    cond = jax.make_jaxpr(lambda *c: [cond_fn(list(c))])(*structs)
    consts = [*body.consts, *cond.consts]
    nb = len(body.consts)

    def trace(consts, evaluate):
        in_avals = [*(jax.typeof(c) for c in consts), *avals]

        def body_all(*args):
            return evaluate(with_consts(body, args[:nb]), *args[len(consts) :])

        def cond_all(*args):
            jaxpr = with_consts(cond, args[nb : len(consts)])
            return evaluate(jaxpr, *args[len(consts) :])

        return consts, retrace(body_all, in_avals), retrace(cond_all, in_avals)

    # Inside `shard_map`: cast replicated constants to varying once, before the loop,
    # so that reverse mode sums their cotangents over devices after the backward loop
    # instead of inside it (see `_devices.py`).
    axes = loop_axes([*cond.out_avals, *avals])
    varied = vary_consts(consts, axes) if axes else None
    if varied is not None:
        try:
            hoisted = trace(varied, eval_jaxpr_varying)
        except CannotVary:
            hoisted = None
        carry_types = (
            None
            if hoisted is None
            else [varying_axes(a) for a in hoisted[1].out_avals[: len(avals)]]
        )
        # Kept unless a replicated carry leaf would become per-device.
        if hoisted is not None and carry_types == [varying_axes(a) for a in avals]:
            return hoisted
    return trace(consts, call)


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


def loop_out_avals(body: ClosedJaxpr, spec: LoopSpec, record: bool) -> list:
    carry = body.out_avals[: spec.num_carry]
    ys = body.out_avals[spec.num_carry :]
    # `update` and `unmapped_aval` keep the `shard_map` varying axes of the values.
    out = [strong_aval(a) for a in carry]
    out += [stacked_aval(output_rows(spec.max_steps), a) for a in ys]
    if record:
        out += [stacked_aval(spec.checkpoints, a) for a in pick(carry, spec.is_stored)]
        out.append(int32_vector_aval(spec.checkpoints))
    return out


def _loop_abstract_eval(*avals, body, cond, spec, record):
    del avals
    return loop_out_avals(body, spec, record), body.effects | cond.effects


def _loop_impl(*args, body, cond, spec, record):
    consts, init = list(args[: spec.num_consts]), list(args[spec.num_consts :])
    n = spec.num_carry

    def step(carry):
        outs = call(body, *consts, *carry)
        return outs[:n], outs[n:]

    def keep_going(carry):
        return call(cond, *consts, *carry)[0]

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
    new_eqn = eqn_like(
        eqn,
        eqn.invars,
        [v for v, k in zip(eqn.outvars, keep_outvars, strict=True) if k],
        dict(eqn.params, body=keep_outputs(body, keep)),
        eqn.effects,
    )
    return [True] * len(eqn.invars), new_eqn


# -- loop_p: jvp ----------------------------------------------------------------------


def _loop_jvp(primals, tangents, *, body, cond, spec, record):
    nc, n = spec.num_consts, spec.num_carry
    ny = len(body.out_avals) - n
    nonzero = [not is_zero(t) for t in tangents]
    const_nz, carry_nz = nonzero[:nc], nonzero[nc:]
    for _ in range(n + 1):
        body_jvp, out_nz = jvp_jaxpr(
            body, const_nz + carry_nz, instantiate=carry_nz + [False] * ny
        )
        grown = [a or b for a, b in zip(carry_nz, out_nz[:n], strict=True)]
        if grown == carry_nz:
            break
        carry_nz = grown
    else:
        raise AssertionError(FIXPOINT_ERROR)
    ys_nz = out_nz[n:]
    n_tc, n_tx, n_ty = sum(const_nz), sum(carry_nz), sum(ys_nz)

    # jvp jaxpr: (consts, carry, const tangents, carry tangents)
    #         -> (carry, ys, carry tangents, ys tangents).
    # The joint loop wants (consts, const tangents, carry, carry tangents)
    #                   -> (carry, carry tangents, ys, ys tangents).
    def joint_body(*args):
        c, tc, x, tx = split_list(args, [nc, n_tc, n])
        outs = call(body_jvp, *c, *x, *tc, *tx)
        y_x, y_y, y_tx, y_ty = split_list(outs, [n, ny, n_tx])
        return [*y_x, *y_tx, *y_y, *y_ty]

    def joint_cond(*args):
        c, _, x, _ = split_list(args, [nc, n_tc, n])
        return call(cond, *c, *x)

    consts, init = primals[:nc], primals[nc:]
    in_avals = [jax.typeof(p) for p in primals]
    joint_avals = [
        *in_avals[:nc],
        *[tangent_aval(a) for a in pick(in_avals[:nc], const_nz)],
        *in_avals[nc:],
        *[tangent_aval(a) for a in pick(in_avals[nc:], carry_nz)],
    ]
    joint_spec = spec.replace(
        num_consts=nc + n_tc,
        is_buffer=spec.is_buffer + tuple(pick(spec.is_buffer, carry_nz)),
        written_through_buffers=spec.written_through_buffers
        + tuple(pick(spec.written_through_buffers, carry_nz)),
    )
    t_consts = [instantiate_zeros(t) for t in pick(tangents[:nc], const_nz)]
    t_init = [instantiate_zeros(t) for t in pick(tangents[nc:], carry_nz)]
    outs = loop_p.bind(
        *consts,
        *t_consts,
        *init,
        *t_init,
        body=retrace(joint_body, joint_avals),
        cond=retrace(joint_cond, joint_avals),
        spec=joint_spec,
        record=record,
    )
    x, tx, y, ty, rest = split_list(outs, [n, n_tx, ny, n_ty])
    primal_out = [*x, *y]
    tangent_out = [
        *fill_zeros(carry_nz, tx, x),
        *fill_zeros(ys_nz, ty, y),
    ]
    if record:
        n_stored = sum(spec.is_stored)
        stack, t_stack, (slot_pos,) = split_list(
            rest, [n_stored, len(rest) - n_stored - 1]
        )
        primal_out += [*stack, slot_pos]
        tangent_out += [
            *fill_zeros(pick(carry_nz, spec.is_stored), t_stack, stack),
            zero_like(slot_pos),
        ]
    return primal_out, tangent_out


def split_list(xs: Sequence[Any], sizes: Sequence[int]) -> list[list]:
    """`xs` cut into consecutive pieces of `sizes`, plus the remainder."""
    out, start = [], 0
    for size in sizes:
        out.append(list(xs[start : start + size]))
        start += size
    out.append(list(xs[start:]))
    return out


def fill_zeros(nonzero: Sequence[bool], values: Sequence[Any], like: Sequence[Any]):
    it = iter(values)
    return [
        next(it) if nz else zero_like(p) for nz, p in zip(nonzero, like, strict=True)
    ]


# -- batching -----------------------------------------------------------------------


def _loop_batch(axis_data, args, dims, *, body, cond, spec, record):
    nc, n = spec.num_consts, spec.num_carry
    ny = len(body.out_avals) - n
    batched = [d is not None for d in dims]
    const_b, carry_b = batched[:nc], batched[nc:]
    for _ in range(n + 1):
        body_b, out_b = batch_jaxpr(
            body, axis_data, const_b + carry_b, instantiate=carry_b + [False] * ny
        )
        grown = [a or b for a, b in zip(carry_b, out_b[:n], strict=True)]
        if grown == carry_b:
            break
        carry_b = grown
    else:
        raise AssertionError(FIXPOINT_ERROR)
    ys_b = out_b[n:]
    cond_b, (pred_b,) = batch_jaxpr(
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
            x = broadcast_batched(x, axis_data) if want else x
        else:
            x = jnp.moveaxis(x, d, 0)
        new_args.append(x)
    outs = loop_p.bind(*new_args, body=body_b, cond=cond_b, spec=spec, record=record)
    out_dims = [0 if b else None for b in carry_b] + [1 if b else None for b in ys_b]
    if record:
        out_dims += [1 if b else None for b in pick(carry_b, spec.is_stored)] + [None]
    return outs, out_dims


loop_p = define_primitive(
    "loopax_checkpointed_loop",
    multiple_results=True,
    impl=_loop_impl,
    effectful_abstract_eval=_loop_abstract_eval,
    jvp=_loop_jvp,
    batch_with_axis_data=_loop_batch,
    dce=_loop_dce,
)
