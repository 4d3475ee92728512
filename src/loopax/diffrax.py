"""A Diffrax adjoint that runs `diffrax.diffeqsolve`'s loops on loopax.

Imported only on request (`import loopax.diffrax`); needs the `clients` extra.
"""

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._custom_types import Kind
from ._while_loop import check_loop_options, while_loop


try:
    import diffrax
except ImportError as e:  # Triggered in tests/test_error_catalogue.py.
    raise ImportError(
        "`loopax.diffrax` needs Diffrax, which is not installed. Install it with "
        '`pip install "loopax[clients]"`.'
    ) from e


def _is_unsafe_brownian(x: Any) -> bool:
    return isinstance(x, diffrax.UnsafeBrownianPath)


def _uses_unsafe_brownian(terms: Any) -> bool:
    leaves = jtu.tree_leaves(terms, is_leaf=_is_unsafe_brownian)
    return any(_is_unsafe_brownian(leaf) for leaf in leaves)


def _is_none(x: Any) -> bool:
    return x is None


def _stage_loop_for_all_transforms(solver: Any) -> Any:
    """`solver`, with its stage loop of a kind that every transformation goes through.

    Diffrax runs the stages of a Runge-Kutta step with `equinox.internal.while_loop`
    (stochastic Runge-Kutta: `equinox.internal.scan`), of the kind named by the
    solver's public `scan_kind` field, not through the adjoint's loops. Its default,
    Equinox's checkpointed loop, has no forward mode. The stage count is small and
    fixed, so storing every stage costs nothing extra: a `"bounded"` loop with
    `base=num_stages` (one `lax.scan`) for Runge-Kutta, a `lax.scan` for stochastic
    Runge-Kutta. A `scan_kind` set by the user is kept.
    """
    if isinstance(solver, diffrax.AbstractRungeKutta) and solver.scan_kind is None:
        return eqx.tree_at(lambda s: s.scan_kind, solver, "bounded", is_leaf=_is_none)
    if isinstance(solver, diffrax.AbstractSRK) and solver.scan_kind is None:
        return eqx.tree_at(lambda s: s.scan_kind, solver, "lax", is_leaf=_is_none)
    return solver


class CheckpointedAdjoint(diffrax.AbstractAdjoint):
    """Differentiate `diffrax.diffeqsolve` through its steps, on loopax's loops.

    A drop-in for `diffrax.RecursiveCheckpointAdjoint` ("discretise-then-optimise":
    the derivative of the numerical solution) that runs the loop over steps and the
    loop over `SaveAt(ts=...)` outputs with [`loopax.while_loop`][], through Diffrax's
    public adjoint interface (no patching). Reverse mode uses loopax's checkpointing
    (fewer recomputations than Equinox's), and, unlike `RecursiveCheckpointAdjoint`,
    forward mode works too, so every transformation goes through `diffeqsolve`:

    | `kind` | jit, vmap | jvp / jacfwd | grad / vjp | hessian (fwd-over-rev) | grad of grad |
    |---|---|---|---|---|---|
    | `"checkpointed"` (default) | yes | yes | yes | yes | yes |
    | `"bounded"` | yes | yes | yes | yes | yes |
    | `"lax"` | yes | yes | no (a clear error) | no | no |
    | `"checkpointed"`, `forward_mode=False` | yes | no | yes | yes | no |

    The Runge-Kutta stage loop is Diffrax's own (`solver.scan_kind`), not the
    adjoint's. With `forward_mode=True` (default), unless you set `scan_kind`, it is
    switched to a kind that stores every stage and supports every transformation (as
    `diffrax.DirectAdjoint` does); this makes reverse mode slower (3.5x the
    gradient time of `forward_mode=False` on a small neural ODE with Tsit5,
    `benchmarks/clients.py --adjoints`). With `forward_mode=False` the stage loop
    stays Equinox's checkpointed loop, as under `RecursiveCheckpointAdjoint`: the
    fastest gradients, Hessians (forward over reverse) still work, but `jvp`/`jacfwd`
    and gradients of gradients do not.

    **Arguments:**

    - `checkpoints`: for `kind="checkpointed"`, how many solver states the backward
        pass may store besides the initial one. `None` (default): about
        $\\log_2$(`max_steps`). With `diffeqsolve(..., max_steps=None)` you must pass
        it to differentiate in reverse mode (forward mode needs neither).
    - `kind`: the kind of [`loopax.while_loop`][] that runs the steps:
        `"checkpointed"` (default), `"bounded"` (needs `max_steps`), or `"lax"`
        (no reverse mode).
    - `base`: for `kind="bounded"`, the length of its nested scans.
    - `forward_mode`: whether the Runge-Kutta stage loop supports forward mode
        (`True`, default: every transformation works) or is the faster reverse-only
        loop (`False`); see above. Ignored by solvers without stages and when the
        solver's `scan_kind` is set.

    Like `RecursiveCheckpointAdjoint`, it rejects `diffrax.UnsafeBrownianPath`
    (use `VirtualBrownianTree`) and ignores `diffeqsolve(..., throw=...)`'s effect on
    differentiation (Diffrax handles `throw` after the loop).

    !!! example

        ```python
        import diffrax
        import jax
        import jax.numpy as jnp
        import loopax.diffrax

        def loss(k):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, k: -k * y), diffrax.Tsit5(),
                t0=0.0, t1=1.0, dt0=0.1, y0=jnp.array(1.0), args=k,
                adjoint=loopax.diffrax.CheckpointedAdjoint(checkpoints=4),
            )
            return sol.ys[-1]

        jax.grad(loss)(1.0), jax.jacfwd(loss)(1.0), jax.hessian(loss)(1.0)
        ```
    """

    checkpoints: int | None = eqx.field(default=None, static=True)
    kind: Kind = eqx.field(default="checkpointed", static=True)
    base: int = eqx.field(default=16, static=True)
    forward_mode: bool = eqx.field(default=True, static=True)

    def __check_init__(self):
        # The step bound comes later, from the solve; 1 stands for it here (so that
        # kind="bounded" passes).
        check_loop_options(
            kind=self.kind,
            max_steps=1,
            checkpoints=self.checkpoints,
            base=self.base,
            buffers=None,
        )

    def loop(
        self,
        *,
        terms,
        solver,
        saveat,
        init_state,
        max_steps,
        throw,
        passed_solver_state,
        passed_controller_state,
        **kwargs,
    ):
        del throw, passed_solver_state, passed_controller_state
        if _uses_unsafe_brownian(terms):
            raise ValueError(
                "`adjoint=loopax.diffrax.CheckpointedAdjoint()` does not support "
                "`diffrax.UnsafeBrownianPath`: its samples cannot be recomputed in "
                "the backward pass. Use `diffrax.VirtualBrownianTree`, or "
                "`adjoint=diffrax.ForwardMode()` for forward mode only."
            )
        # The loop over steps stores checkpoints; the loop over `SaveAt(ts=...)`
        # outputs is short and Diffrax passes it `checkpoints=len(ts)` itself.
        outer_while_loop = jax.named_call(
            ft.partial(
                while_loop,
                kind=self.kind,
                checkpoints=self.checkpoints,
                base=self.base,
            ),
            name="outer-loop",
        )
        inner_while_loop = jax.named_call(
            ft.partial(while_loop, kind=self.kind, base=self.base),
            name="inner-loop",
        )
        # `AbstractAdjoint._loop` is Diffrax's documented route for adjoints to run
        # the integration (its own adjoints use it).
        return self._loop(
            terms=terms,
            solver=(
                _stage_loop_for_all_transforms(solver) if self.forward_mode else solver
            ),
            saveat=saveat,
            init_state=init_state,
            max_steps=max_steps,
            inner_while_loop=inner_while_loop,
            outer_while_loop=outer_while_loop,
            **kwargs,
        )
