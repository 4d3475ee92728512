"""`kind="lax"`: a plain `jax.lax.while_loop` over the shared loop state."""

import equinox as eqx
import jax.lax as lax

from .._forward_only import forward_only
from .._state import Loop, LoopState


_REVERSE_MODE_ERROR = (
    "Reverse-mode differentiation (grad, vjp, jacrev) is not supported "
    "by `loopax.while_loop(..., kind='lax')`, which is a plain `lax.while_loop` and "
    "supports forward mode (jvp, jacfwd, linearize) only. Use kind='checkpointed' (optionally "
    "with `checkpoints=` or `max_steps=`) or kind='bounded' (with `max_steps=`) "
    "instead."
)


def lax_while_loop(
    loop: Loop, *, reverse_mode_error: str = _REVERSE_MODE_ERROR
) -> LoopState:
    """Run `loop` with `lax.while_loop`: forward-mode differentiable, not reverse-mode.

    `reverse_mode_error` is what reverse-mode differentiation raises; other kinds that
    fall back to this backend pass their own.
    """
    init_state = loop.init()
    # Closure-convert so that arrays the body closes over are inputs we can mark too.
    body = eqx.filter_closure_convert(loop.body, init_state)
    body = forward_only(body, reverse_mode_error)
    init_state = forward_only(init_state, reverse_mode_error)
    final = lax.while_loop(loop.cond, lambda state: body(state), init_state)
    # Reverse mode reaches the outputs' markers first, before `lax.while_loop`.
    return forward_only(final, reverse_mode_error)
