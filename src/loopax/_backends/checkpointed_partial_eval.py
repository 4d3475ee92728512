"""Reverse mode of `loop_p`: its partial-evaluation rules.

Partial evaluation is the step that turns `jvp` into `linearize`, and so into `vjp`
and `grad`. With some inputs unknown (tangents), the loop splits (`split_loop`):
the known (primal) part runs as a *recording* `loop_p`, whose checkpoints are the
residuals, and the unknown (tangent) part is staged as a `linear_loop_p`, whose
transpose is the backward sweep. When every step can be stored (`store_all`), the
recording loop stacks each step's linearization residuals instead, like `lax.scan`.

Inside `jax.checkpoint` (remat), JAX uses the second rule below: the loop over the
known part runs, and the whole loop is staged to be recomputed.
"""

from .._jax_internals import (
    eqn_like,
    forwarded_inputs,
    is_known,
    is_var,
    known_value,
    register_partial_eval,
    stage_known,
    stage_primitive,
    stage_unknown,
)
from .checkpointed_linear import linear_loop_p, split_loop
from .checkpointed_loop import keep_outputs, loop_p, split_list
from .checkpointed_sweeps import merge, pick


def _loop_partial_eval(trace, *tracers, body, cond, spec, record):
    params = dict(body=body, cond=cond, spec=spec, record=record)
    unknown = [not is_known(t) for t in tracers]
    split = split_loop(body, cond, spec, unknown)
    const_uk, carry_uk, ys_uk = (
        list(split.const_uk),
        list(split.carry_uk),
        list(split.ys_uk),
    )
    known_body = split.known_body
    if not any(unknown) or not split.splittable or all(const_uk + carry_uk):
        # Nothing known to split off (or the loop's length itself is unknown).
        return stage_primitive(trace, loop_p, tracers, params)

    known_in = [
        known_value(t)
        for t, uk in zip(tracers, const_uk + carry_uk, strict=True)
        if not uk
    ]
    known_consts, known_init = (
        known_in[: const_uk.count(False)],
        known_in[const_uk.count(False) :],
    )
    nk, nky = split.num_known_carry, split.num_known_ys
    if spec.store_all:
        # Like `lax.scan`: stack each step's residuals as per-step outputs, except
        # those that are known constants (e.g. weight matrices), which are passed
        # once. Nothing else is recorded.
        residual_const = forwarded_inputs(
            known_body, slice(nk + nky, None), len(known_consts)
        )
        stacked_residuals = [i < 0 for i in residual_const]
    else:
        # Record checkpoints; the residuals are recomputed from them.
        residual_const = ()
        stacked_residuals = [False] * (len(known_body.out_avals) - nk - nky)
    known_out = loop_p.bind(
        *known_consts,
        *known_init,
        body=keep_outputs(known_body, [True] * (nk + nky) + stacked_residuals),
        cond=split.known_cond,
        spec=split.known_spec,
        record=not spec.store_all,
    )
    known_final, known_ys, recorded = split_list(known_out, [nk, nky])

    split = split.replace(residual_const=residual_const)
    residuals = [*known_consts, *known_init, *known_final, *recorded]
    uk_tracers = [
        stage_unknown(trace, t)
        for t, uk in zip(tracers, const_uk + carry_uk, strict=True)
        if uk
    ]
    linear_out = stage_primitive(
        trace,
        linear_loop_p,
        [*(stage_known(trace, r) for r in residuals), *uk_tracers],
        dict(params, split=split),
    )
    lin_carry, lin_ys, lin_stack = split_list(
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
    split = split_loop(body, cond, spec, unks_in)
    out_uk = [*split.carry_uk, *split.ys_uk]
    if record:
        out_uk += [*pick(split.carry_uk, spec.is_stored), False]
    new_inst = [
        x for x, inst in zip(eqn.invars, inst_in, strict=True) if is_var(x) and not inst
    ]
    if not split.splittable:
        return None, eqn, [True] * len(eqn.outvars), [True] * len(eqn.outvars), new_inst
    nk, nky = split.num_known_carry, split.num_known_ys
    stepping = keep_outputs(
        split.known_body,
        [True] * (nk + nky) + [False] * (len(split.known_body.out_avals) - nk - nky),
    )
    params_known = dict(
        body=stepping, cond=split.known_cond, spec=split.known_spec, record=record
    )
    eqn_known = eqn_like(
        eqn,
        pick(eqn.invars, split.const_uk + split.carry_uk, False),
        pick(eqn.outvars, out_uk, False),
        params_known,
        stepping.effects | split.known_cond.effects,
    )
    return eqn_known, eqn, out_uk, [True] * len(out_uk), new_inst


register_partial_eval(
    loop_p,
    partial_eval=_loop_partial_eval,
    partial_eval_custom=_loop_partial_eval_custom,
)
