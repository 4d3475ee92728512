"""`linear_loop_p`: the tangent (linear) part of a checkpointed loop, and its
transpose, the checkpointed backward sweep.

When reverse mode partially evaluates a `loop_p` (`checkpointed_partial_eval.py`),
the loop is split in two (`LoopSplit`): a known primal part, which runs forward as a
recording `loop_p`, and the linear part, staged as `linear_loop_p`. Its transpose
is the backward sweep (`checkpointed_sweeps.py`), built from `loop_p`s itself so
that it can be differentiated again (reverse-over-reverse) in bounded memory; when
every step can be stored (`store_all`), the recording loop stacked each step's
linearization residuals instead, like `lax.scan`, and the transpose reads them.

`linear_loop_p`, evaluated forward (e.g. the function `jax.linearize` returns),
simply reruns the whole loop from its initial state.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .._buffer import mark_read_once
from .._devices import VARYING_TRIP_COUNT_ERROR
from .._jax_internals import (
    ClosedJaxpr,
    define_primitive,
    instantiate_zeros,
    is_undefined_primal,
    is_zero,
    partial_eval_jaxpr,
    pvary_sources,
    row_aval,
    undefined_or_value_aval,
    varying_axes,
)
from .checkpointed_loop import (
    FIXPOINT_ERROR,
    LoopSpec,
    call,
    differentiable_while_loop,
    keep_outputs,
    loop_out_avals,
    loop_p,
    shape_structs,
    split_list,
)
from .checkpointed_sweeps import (
    checkpointed_backward,
    merge,
    per_step_backward,
    pick,
    zeros,
)


# -- the split of a loop into a known and a linear part -------------------------------


@dataclasses.dataclass(frozen=True)
class LoopSplit:
    """How a loop whose inputs are partly unknown splits into a known (primal) part
    and an unknown (linear) part; the one record partial evaluation, remat and the
    transpose share.

    - `const_uk`, `carry_uk`, `ys_uk`: which constants, carry leaves and per-step
      outputs are unknown (a fixpoint: a carry leaf is unknown if the body makes it
      depend on an unknown);
    - `known_body`: known constants and carry -> known carry, known per-step outputs
      and residuals; `unknown_body`: residuals, unknown constants and carry -> unknown
      carry and per-step outputs (linear in the unknowns);
    - `known_cond`, `known_spec`: the predicate and spec of a loop over the known part;
    - `splittable`: false when the loop's length depends on an unknown (nothing can
      be split off);
    - `residual_const`: `store_all` only: per residual, the index of the known
      constant it is (not stacked), or -1 for a residual stacked per step.
    """

    const_uk: tuple[bool, ...]
    carry_uk: tuple[bool, ...]
    ys_uk: tuple[bool, ...]
    known_body: ClosedJaxpr
    unknown_body: ClosedJaxpr
    known_cond: ClosedJaxpr
    known_spec: LoopSpec
    splittable: bool
    residual_const: tuple[int, ...] = ()

    @property
    def num_known_carry(self) -> int:
        return self.carry_uk.count(False)

    @property
    def num_known_ys(self) -> int:
        return self.ys_uk.count(False)

    def replace(self, **changes) -> "LoopSplit":
        return dataclasses.replace(self, **changes)


def split_loop(
    body: ClosedJaxpr, cond: ClosedJaxpr, spec: LoopSpec, unknown: Sequence[bool]
) -> LoopSplit:
    """Split the loop `(body, cond, spec)` given which of its inputs are unknown."""
    const_uk = list(unknown[: spec.num_consts])
    carry_uk = list(unknown[spec.num_consts :])
    num_ys = len(body.out_avals) - len(carry_uk)
    for _ in range(len(carry_uk) + 1):
        known_body, unknown_body, out_uk = partial_eval_jaxpr(
            body, const_uk + carry_uk, instantiate=carry_uk + [False] * num_ys
        )
        grown = [a or b for a, b in zip(carry_uk, out_uk, strict=False)]
        if grown == carry_uk:
            break
        carry_uk = grown
    else:
        raise AssertionError(FIXPOINT_ERROR)
    ys_uk = out_uk[len(carry_uk) :]
    cond_known, _, (cond_uk,) = partial_eval_jaxpr(
        cond, const_uk + carry_uk, instantiate=False
    )
    cond_known = keep_outputs(
        cond_known, [True] + [False] * (len(cond_known.out_avals) - 1)
    )
    known_spec = spec.replace(
        num_consts=const_uk.count(False),
        is_buffer=tuple(pick(spec.is_buffer, carry_uk, False)),
        written_through_buffers=tuple(
            pick(spec.written_through_buffers, carry_uk, False)
        ),
    )
    return LoopSplit(
        const_uk=tuple(const_uk),
        carry_uk=tuple(carry_uk),
        ys_uk=tuple(ys_uk),
        known_body=known_body,
        unknown_body=unknown_body,
        known_cond=cond_known,
        known_spec=known_spec,
        splittable=not (cond_uk or carry_uk[0]),
    )


# -- linear_loop_p: evaluation and transpose--------------------------------------------------------------


def _linear_layout(spec: LoopSpec, split: LoopSplit, record: bool) -> list[int]:
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


def _unknown_outputs(
    outs: Sequence[Any], spec: LoopSpec, record: bool, split: LoopSplit
):
    """The outputs of the linear part, from the outputs of the whole loop."""
    n = spec.num_carry
    ny = len(outs) - n - (sum(spec.is_stored) + 1 if record else 0)
    carry, ys, stack = split_list(outs, [n, ny])
    uk = [*pick(carry, split.carry_uk), *pick(ys, split.ys_uk)]
    if record:
        uk += pick(stack[:-1], pick(split.carry_uk, spec.is_stored))
    return uk


def _linear_abstract_eval(*avals, body, cond, spec, record, split):
    del avals
    outs = loop_out_avals(body, spec, record)
    return _unknown_outputs(outs, spec, record, split), body.effects | cond.effects


def _linear_impl(*args, body, cond, spec, record, split):
    """Forward evaluation: rerun the whole loop from its initial state."""
    k_consts, k_init, _, _, u_consts, u_init = split_list(
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
    layout = _linear_layout(spec, split, record)
    k_consts, k_init, k_final, recorded, u_consts, u_init = split_list(args, layout)
    out_avals = _unknown_outputs(
        loop_out_avals(body, spec, record), spec, record, split
    )
    stack_ct_zero = [
        is_zero(ct) for ct in cts[len(cts) - _num_stack_outs(spec, record, split) :]
    ]
    n_uc = len(u_consts)
    n_ux = split.carry_uk.count(True)
    n_uy = split.ys_uk.count(True)
    ct_final, ct_ys, ct_stack = split_list(cts, [n_ux, n_uy])
    final_avals, ys_avals, stack_avals = split_list(out_avals, [n_ux, n_uy])
    ct_final = [_instantiate(c, a) for c, a in zip(ct_final, final_avals, strict=True)]
    ct_stack = [_instantiate(c, a) for c, a in zip(ct_stack, stack_avals, strict=True)]

    def ct_ys_row(k):
        """Step `k`'s row of the per-step outputs' cotangents (zeros, never a stack of
        zeros, for outputs without one)."""
        return [
            zeros(row_aval(a)) if is_zero(ct) else ct[k]
            for ct, a in zip(ct_ys, ys_avals, strict=True)
        ]

    u_const_avals = [undefined_or_value_aval(x) for x in u_consts]
    u_carry_avals = [undefined_or_value_aval(x) for x in u_init]
    ct_consts = [zeros(a) for a in u_const_avals]
    nk, nky = split.num_known_carry, split.num_known_ys

    # The body's writes into this loop's buffers may skip zeroing the written entries
    # of the cotangent (see `_buffer.py`) unless the cotangent of a written leaf's
    # initial value is asked for: by contract no earlier step reads those entries.
    written = pick(spec.written_through_buffers, split.carry_uk)
    unknown_body = split.unknown_body
    if not any(
        w and is_undefined_primal(x) for w, x in zip(written, u_init, strict=True)
    ):
        num_residuals = len(unknown_body.in_avals) - n_uc - len(u_init)
        unknown_body = mark_read_once(
            unknown_body, [False] * (num_residuals + n_uc) + written
        )

    num_linear = n_uc + len(u_init)
    if varying_axes(cond.out_avals[0]) and pvary_sources(
        unknown_body,
        [False] * (len(unknown_body.in_avals) - num_linear) + [True] * num_linear,
    ):
        # The backward loop would sum a cotangent over devices once per step, and
        # the devices run different numbers of steps: a deadlock or a wrong sum.
        raise ValueError(
            VARYING_TRIP_COUNT_ERROR.format(axes=varying_axes(cond.out_avals[0]))
        )

    def transpose_unknown(residuals, ct_out):
        """Cotangents of the unknown constants and carry, given one step's residuals."""
        cts_in = jax.linear_transpose(
            lambda *lin: call(unknown_body, *residuals, *lin),
            *shape_structs(u_const_avals + u_carry_avals),
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
        advance_jaxpr = keep_outputs(
            split.known_body,
            [True] * nk + [False] * (len(split.known_body.out_avals) - nk),
        )

        def advance(state):
            return call(advance_jaxpr, *k_consts, *state)

        def transpose_step(state, ct_state, k):
            residuals = call(split.known_body, *k_consts, *state)[nk + nky :]
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
            ct if is_undefined_primal(x) else None
            for x, ct in zip(u_consts, ct_consts, strict=True)
        ],
        *[
            ct if is_undefined_primal(x) else None
            for x, ct in zip(u_init, ct_init, strict=True)
        ],
    ]


def _num_stack_outs(spec: LoopSpec, record: bool, split: LoopSplit) -> int:
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
    tangents = tuple(instantiate_zeros(t) for t in tangents)
    return jax.jvp(lambda *a: _linear_impl(*a, **params), tuple(primals), tangents)


def _linear_batch(args, dims, **params):
    in_axes = [d for d in dims]
    outs = jax.vmap(lambda *a: _linear_impl(*a, **params), in_axes=in_axes)(*args)
    return outs, [0] * len(outs)


linear_loop_p = define_primitive(
    "loopax_checkpointed_linear_loop",
    multiple_results=True,
    impl=_linear_impl,
    effectful_abstract_eval=_linear_abstract_eval,
    jvp=_linear_jvp,
    transpose=_linear_transpose,
    batch=_linear_batch,
)


def _instantiate(ct, aval) -> Any:
    return zeros(aval) if is_zero(ct) else ct
