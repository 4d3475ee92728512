"""`kind="checkpointed"`: reverse mode through a loop of unknown length, in bounded memory.

Undifferentiated, this is a plain `lax.while_loop`. Its reverse-mode rule (a
`jax.custom_vjp`) is:

- **Forward sweep**: the same while loop, plus a checkpoint stack of `checkpoints`
  slots. After each step the *online* rule (`_schedule/online.py`) says whether to
  store the new state and into which slot; the store is a `lax.cond`, so steps that do
  not save do not touch the stack. Buffers are never stored; the final buffers are
  kept once.
- **Backward sweep**: one `lax.while_loop` that executes the *reverse* controller
  (`_schedule/reverse.py`) one action per iteration: either advance the current state
  with the plain body (storing it into a free slot when the offline revolve rule says
  so), or run the VJP of one step and restore the next state from a slot. The body is
  traced once for advancing and once for the VJP, whatever `checkpoints` is.

With `checkpoints >= max_steps` every state is stored (no controller at all) and the
backward sweep is a plain reversed loop of VJPs.
"""

import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array

from .._schedule import (
    OnlineState,
    ReverseAction,
    online_init,
    online_step,
    plain_advances,
    reverse_done,
    reverse_init,
    reverse_step,
)
from .._state import Loop, LoopState
from .lax import lax_while_loop


# `ReverseAction.store_slot` of the inner backward loop's initial action: no advance is
# pending. (-1 means "advance without storing"; slots are >= 0.)
_NO_ADVANCE = -2


_NEEDS_CHECKPOINTS = (
    "Reverse-mode differentiation of `loopax.while_loop(..., kind='checkpointed')` needs "
    "to know how many loop states it may store: pass `checkpoints=` (e.g. "
    "`checkpoints=16`) or `max_steps=` (then `checkpoints` defaults to "
    "ceil(log2(max_steps + 1)))."
)


def default_checkpoints(max_steps: int) -> int:
    """`checkpoints` when only `max_steps` is given: `max(1, ceil(log2(max_steps + 1)))`.

    Logarithmic memory keeps the repetition number small: with c slots a loop of up to
    C(c + r, c) steps is reversed with each step recomputed at most r times
    (Griewank & Walther 2000), and C(c + r, c) >= 2**c - 1 for r >= c.
    """
    return max(1, math.ceil(math.log2(max_steps + 1)))


def checkpointed_while_loop(
    loop: Loop, *, checkpoints: int | None, forward_slots: np.ndarray | None = None
) -> LoopState:
    """Run `loop` as a `lax.while_loop` whose reverse mode uses `checkpoints` slots.

    `forward_slots`, for loops whose trip count is known up front (`loopax.scan`):
    an int32 array with one entry per step, `forward_slots[k - 1]` the slot to store
    `x_k` into or -1 (see `revolve_forward_slots`). The forward sweep then looks its
    decisions up in this table instead of running the online rule. The loop must run
    at most `len(forward_slots)` steps: `loop.max_steps` must equal it.

    ??? cite "References"

        ```bibtex
        @article{griewank2000revolve,
            author = {Griewank, Andreas and Walther, Andrea},
            title = {Algorithm 799: Revolve: An Implementation of Checkpointing for the
                     Reverse or Adjoint Mode of Computational Differentiation},
            journal = {ACM Trans. Math. Softw.},
            volume = {26}, number = {1}, pages = {19--45}, year = {2000},
        }
        @article{stumm2010online,
            author = {Stumm, Philipp and Walther, Andrea},
            title = {New Algorithms for Optimal Online Checkpointing},
            journal = {SIAM J. Sci. Comput.},
            volume = {32}, number = {2}, pages = {836--854}, year = {2010},
        }
        @article{wang2009minimal,
            author = {Wang, Qiqi and Moin, Parviz and Iaccarino, Gianluca},
            title = {Minimal Repetition Dynamic Checkpointing Algorithm for Unsteady
                     Adjoint Calculation},
            journal = {SIAM J. Sci. Comput.},
            volume = {31}, number = {4}, pages = {2549--2567}, year = {2009},
        }
        ```
    """
    if checkpoints is None:
        if loop.max_steps is None:
            return lax_while_loop(loop, reverse_mode_error=_NEEDS_CHECKPOINTS)
        checkpoints = default_checkpoints(loop.max_steps)
    store_all = loop.max_steps is not None and checkpoints >= loop.max_steps
    if store_all:
        checkpoints = max(1, loop.max_steps or 0)
        forward_slots = None
    if forward_slots is not None and (
        loop.max_steps is None or np.shape(forward_slots) != (loop.max_steps,)
    ):
        raise AssertionError(
            "loopax internal error: `forward_slots` must have one entry per step up "
            "to `max_steps`; please report a bug."
        )

    init_state = loop.init()
    # Closure-convert: arrays the body closes over become explicit inputs, so they get
    # cotangents like everything else.
    # Closure-convert: arrays the body and the predicate close over (weights, outer
    # loops' tracers) become explicit inputs of the custom_vjp, so they get cotangents
    # and never leak out of it as closed-over tracers.
    converted = (
        eqx.filter_closure_convert(loop.body, init_state),
        eqx.filter_closure_convert(loop.cond, init_state),
    )
    params, fns_static = eqx.partition(converted, eqx.is_array)
    param_leaves, param_def = jtu.tree_flatten(params)
    state_leaves, state_def = jtu.tree_flatten(init_state)
    layout = _Layout(param_leaves, state_leaves, (False, *loop.is_buffer))
    run = _make_run(
        loop,
        layout,
        fns_static,
        param_def,
        state_def,
        checkpoints,
        store_all,
        forward_slots,
    )
    out = run(*layout.split(param_leaves, state_leaves))
    return jtu.tree_unflatten(state_def, out)


class _Layout:
    """Which flat leaves are differentiable (inexact), and which state leaves are buffers."""

    def __init__(
        self, param_leaves: list, state_leaves: list, is_buffer: tuple[bool, ...]
    ):
        if len(is_buffer) != len(state_leaves):
            raise AssertionError(
                "loopax internal error: buffer mask misaligned; please report a bug."
            )
        self.param_diff = tuple(eqx.is_inexact_array(x) for x in param_leaves)
        self.state_diff = tuple(eqx.is_inexact_array(x) for x in state_leaves)
        self.is_buffer = is_buffer

    @staticmethod
    def _pick(leaves, mask, want):
        return [x for x, m in zip(leaves, mask, strict=True) if m == want]

    @staticmethod
    def _merge(mask, diff, rest):
        diff, rest = iter(diff), iter(rest)
        return [next(diff) if m else next(rest) for m in mask]

    def split(self, param_leaves, state_leaves):
        return (
            self._pick(param_leaves, self.param_diff, True),
            self._pick(state_leaves, self.state_diff, True),
            self._pick(param_leaves, self.param_diff, False),
            self._pick(state_leaves, self.state_diff, False),
        )

    def params(self, p_diff, p_rest):
        return self._merge(self.param_diff, p_diff, p_rest)

    def state(self, s_diff, s_rest):
        return self._merge(self.state_diff, s_diff, s_rest)

    def state_diff_part(self, state_leaves):
        return self._pick(state_leaves, self.state_diff, True)

    def stored(self, state_leaves):
        """The leaves a checkpoint holds: everything but buffers."""
        return self._pick(state_leaves, self.is_buffer, False)

    def with_stored(self, state_leaves, stored):
        """`state_leaves` with its non-buffer leaves replaced by `stored`."""
        return self._merge(
            [not b for b in self.is_buffer],
            stored,
            self._pick(state_leaves, self.is_buffer, True),
        )


def _write_slot(stack: list[Array], slot, leaves: list[Array]) -> list[Array]:
    return [s.at[slot].set(x) for s, x in zip(stack, leaves, strict=True)]


def _read_slot(stack: list[Array], slot) -> list[Array]:
    return [s[slot] for s in stack]


def _make_run(
    loop: Loop,
    layout: _Layout,
    fns_static,
    param_def,
    state_def,
    checkpoints: int,
    store_all: bool,
    forward_slots: np.ndarray | None,
):
    def step_fn(p_diff, p_rest):
        body, _ = eqx.combine(
            jtu.tree_unflatten(param_def, layout.params(p_diff, p_rest)), fns_static
        )

        def step(state_leaves: list[Array]) -> list[Array]:
            return jtu.tree_leaves(body(jtu.tree_unflatten(state_def, state_leaves)))

        return step

    def cond_fn(p_diff, p_rest):
        _, cond = eqx.combine(
            jtu.tree_unflatten(param_def, layout.params(p_diff, p_rest)), fns_static
        )
        return lambda state_leaves: cond(jtu.tree_unflatten(state_def, state_leaves))

    def linearize(p_diff, p_rest, state):
        """One step and its VJP function (a pytree of residuals) at `state`."""
        s_rest = [x for x, d in zip(state, layout.state_diff, strict=True) if not d]

        def diff_step(pd, sd):
            out = step_fn(pd, p_rest)(layout.state(sd, s_rest))
            return layout.state_diff_part(out), out

        _, step_vjp, out = jax.vjp(
            diff_step, p_diff, layout.state_diff_part(state), has_aux=True
        )
        return out, step_vjp

    def apply_vjp(step_vjp, ct_state, ct_params):
        ct_p, ct_s = step_vjp(ct_state)
        return ct_s, [a + b for a, b in zip(ct_params, ct_p, strict=True)]

    @jax.custom_vjp
    def run(p_diff, s_diff, p_rest, s_rest):
        return lax.while_loop(
            cond_fn(p_diff, p_rest),
            step_fn(p_diff, p_rest),
            layout.state(s_diff, s_rest),
        )

    if store_all:
        _def_store_all_vjp(run, cond_fn, linearize, apply_vjp, layout, checkpoints)
    else:
        _def_checkpointed_vjp(
            run,
            cond_fn,
            step_fn,
            linearize,
            apply_vjp,
            layout,
            checkpoints,
            forward_slots,
        )
    return run


def _def_store_all_vjp(
    run, cond_fn, linearize, apply_vjp, layout: _Layout, max_steps: int
) -> None:
    """`checkpoints >= max_steps`: like `lax.scan`, store every step's VJP residuals.

    The backward sweep then only runs the linear part of each step's VJP, with no
    recomputation and no controller. Residuals that are the loop's parameters
    themselves (e.g. weight matrices) are recognised and not stacked.
    """
    found = {}

    def residuals_of(p_diff, p_rest, state):
        out, step_vjp = linearize(p_diff, p_rest, state)
        leaves, found["treedef"] = jtu.tree_flatten(step_vjp)
        params = [*p_diff, *p_rest]
        # For each residual: the index of the parameter it *is*, or -1 if it varies by step.
        found["param_index"] = [
            next((i for i, p in enumerate(params) if leaf is p), -1) for leaf in leaves
        ]
        return out, [
            leaf for leaf, i in zip(leaves, found["param_index"], strict=True) if i < 0
        ]

    def fwd(p_diff, s_diff, p_rest, s_rest):
        state = layout.state(s_diff, s_rest)
        shapes = jax.eval_shape(
            lambda pd, pr, st: residuals_of(pd, pr, st)[1], p_diff, p_rest, state
        )
        stack = [jnp.zeros((max_steps, *x.shape), x.dtype) for x in shapes]

        def forward_step(carry):
            state, stack = carry
            k = state[
                0
            ]  # The step counter: `state` is the flat `LoopState(step, ...)`.
            state, residuals = residuals_of(p_diff, p_rest, state)
            return state, _write_slot(stack, k, residuals)

        final, stack = lax.while_loop(
            lambda c: cond_fn(p_diff, p_rest)(c[0]), forward_step, (state, stack)
        )
        return final, (p_diff, p_rest, stack, final[0])

    def bwd(residuals, ct_final):
        p_diff, p_rest, stack, num_steps = residuals
        params = [*p_diff, *p_rest]

        def reverse_step(carry):
            k, ct_state, ct_params = carry
            varying = iter(_read_slot(stack, k))
            leaves = [
                params[i] if i >= 0 else next(varying) for i in found["param_index"]
            ]
            step_vjp = jtu.tree_unflatten(found["treedef"], leaves)
            ct_state, ct_params = apply_vjp(step_vjp, ct_state, ct_params)
            return k - 1, ct_state, ct_params

        carry = (
            num_steps - 1,
            layout.state_diff_part(ct_final),
            [jnp.zeros_like(x) for x in p_diff],
        )
        _, ct_state, ct_params = lax.while_loop(
            lambda c: c[0] >= 0, reverse_step, carry
        )
        return ct_params, ct_state, None, None

    run.defvjp(fwd, bwd)


def _def_checkpointed_vjp(
    run,
    cond_fn,
    step_fn,
    linearize,
    apply_vjp,
    layout: _Layout,
    checkpoints: int,
    forward_slots: np.ndarray | None,
) -> None:
    """The general case: online checkpoints forward (or the decisions in
    `forward_slots`, when the trip count is known), revolve reversal backward."""

    def choose_slot(online, k):
        """The slot to store `x_k` into (or -1), and the policy's new state."""
        if forward_slots is None:
            return online_step(online, k, jnp)
        # A constant lookup; the slot positions are tracked for the backward sweep.
        slot = jnp.asarray(forward_slots)[k - 1]
        slots = jnp.arange(checkpoints, dtype=jnp.int32)
        slot_pos = jnp.where(slots == slot, k, online.slot_pos).astype(jnp.int32)
        return slot, OnlineState(slot_pos)

    def fwd(p_diff, s_diff, p_rest, s_rest):
        step = step_fn(p_diff, p_rest)
        state = layout.state(s_diff, s_rest)
        stack = [
            jnp.zeros((checkpoints, *jnp.shape(x)), jnp.result_type(x))
            for x in layout.stored(state)
        ]

        def forward_step(carry):
            state, stack, online = carry
            state = step(state)
            slot, online = choose_slot(online, state[0])  # state[0]: the step counter.
            # Only saving steps touch the stack.
            stack = lax.cond(
                slot >= 0,
                lambda: _write_slot(stack, slot, layout.stored(state)),
                lambda: stack,
            )
            return state, stack, online

        online = online_init(checkpoints, jnp)
        final, stack, online = lax.while_loop(
            lambda c: cond_fn(p_diff, p_rest)(c[0]),
            forward_step,
            (state, stack, online),
        )
        residuals = (p_diff, p_rest, s_diff, s_rest, stack, online.slot_pos, final)
        return final, residuals

    def bwd(residuals, ct_final):
        p_diff, p_rest, s_diff, s_rest, stack, slot_pos, final = residuals
        step = step_fn(p_diff, p_rest)
        init_stored = layout.stored(layout.state(s_diff, s_rest))

        def restore(stack, slot):
            """The stored leaves of the state in `slot` (-1: the initial state)."""
            return lax.cond(
                slot < 0, lambda: init_stored, lambda: _read_slot(stack, slot)
            )

        # The backward sweep carries only the stored (non-buffer) leaves. Every body
        # call reads the *final* buffers, which by the buffer contract hold every value
        # any step reads; the buffer writes of recomputed steps are dead code, so
        # buffers are neither copied nor rewritten.
        def full_state(stored):
            return layout.with_stored(final, stored)

        def advance(stored):
            return layout.stored(step(full_state(stored)))

        def next_action(stored, control):
            """Run the plain advances ahead (a tight loop of body calls, no
            controller), then one controller step: a store-advance or a VJP."""
            count = plain_advances(control, jnp)
            _, stored = lax.while_loop(
                lambda c: c[0] < count, lambda c: (c[0] + 1, advance(c[1])), (0, stored)
            )
            control = control._replace(cur=control.cur + count)
            action, control = reverse_step(control, jnp)
            return stored, action, control

        def advance_and_store(carry):
            """Carry out the pending store-advance (if any), then find the next action."""
            stack, stored, action, control = carry
            stored = lax.cond(
                action.store_slot >= _NO_ADVANCE + 1, advance, lambda s: s, stored
            )
            stack = lax.cond(
                action.store_slot >= 0,
                lambda: _write_slot(stack, action.store_slot, stored),
                lambda: stack,
            )
            return (stack, *next_action(stored, control))

        def reverse_iteration(carry):
            """Every advance up to the next VJP, then that VJP.

            No stack- or buffer-sized value passes through a `lax.cond` with two live
            branches: XLA copies such operands, which cost a copy of the stack (or of
            a buffer's cotangent) per iteration. The inner loop starts from a "nothing
            pending" action so that the body appears once per kind of use (plain
            advance, store-advance, VJP) in the compiled program."""
            stored, stack, ct_state, ct_params, control = carry
            nothing = ReverseAction(
                is_vjp=jnp.array(False),
                step=jnp.array(0, jnp.int32),
                store_slot=jnp.array(_NO_ADVANCE, jnp.int32),
                restore_slot=jnp.array(-1, jnp.int32),
            )
            stack, stored, action, control = lax.while_loop(
                lambda c: jnp.logical_not(c[2].is_vjp),
                advance_and_store,
                (stack, stored, nothing, control),
            )
            _, step_vjp = linearize(p_diff, p_rest, full_state(stored))
            ct_state, ct_params = apply_vjp(step_vjp, ct_state, ct_params)
            return (
                restore(stack, action.restore_slot),
                stack,
                ct_state,
                ct_params,
                control,
            )

        restore_slot, control = reverse_init(slot_pos, final[0], checkpoints, jnp)
        carry = (
            restore(stack, restore_slot),
            stack,
            layout.state_diff_part(ct_final),
            [jnp.zeros_like(x) for x in p_diff],
            control,
        )
        _, _, ct_state, ct_params, _ = lax.while_loop(
            lambda c: jnp.logical_not(reverse_done(c[-1], jnp)),
            reverse_iteration,
            carry,
        )
        return ct_params, ct_state, None, None

    run.defvjp(fwd, bwd)
