"""An Optimistix adjoint that runs the solver's iterations on loopax.

Imported only on request (`import loopax.optimistix`); needs the `clients` extra.
"""

import functools as ft

import equinox as eqx

from ._custom_types import Kind
from ._while_loop import check_loop_options, while_loop


try:
    import optimistix
except ImportError as e:  # The message of `loopax.diffrax`'s, for Optimistix.
    raise ImportError(
        "`loopax.optimistix` needs Optimistix, which is not installed. Install it "
        'with `pip install "loopax[clients]"`.'
    ) from e


class CheckpointedAdjoint(optimistix.AbstractAdjoint):
    """Differentiate an Optimistix solve through its iterations, on loopax's loop.

    A drop-in for `optimistix.RecursiveCheckpointAdjoint`: `root_find`, `minimise`,
    `least_squares` and `fixed_point` run their iterations with
    [`loopax.while_loop`][], through Optimistix's public adjoint interface (no
    patching), and the derivative is that of the unrolled iterations. This is the
    choice when the solver stops before it converges (a fixed iteration budget, a
    loose tolerance), where the implicit function theorem
    (`optimistix.ImplicitAdjoint`) does not apply. Unlike
    `RecursiveCheckpointAdjoint`, forward mode works too:

    | `kind` | jit, vmap | jvp / jacfwd | grad / vjp | hessian (fwd-over-rev) | grad of grad |
    |---|---|---|---|---|---|
    | `"checkpointed"` (default) | yes | yes | yes | yes | yes |
    | `"bounded"` | yes | yes | yes | yes | yes |
    | `"lax"` | yes | yes | no (a clear error) | no | no |

    **Arguments:**

    - `checkpoints`: for `kind="checkpointed"`, how many iterates the backward pass
        may store besides the initial one. `None` (default): about
        $\\log_2$(`max_steps`); with `max_steps=None` you must pass it to
        differentiate in reverse mode.
    - `kind`: the kind of [`loopax.while_loop`][] that runs the iterations:
        `"checkpointed"` (default), `"bounded"` (needs `max_steps`), or `"lax"`
        (no reverse mode).
    - `base`: for `kind="bounded"`, the length of its nested scans.

    !!! example

        ```python
        import jax
        import jax.numpy as jnp
        import optimistix as optx
        import loopax.optimistix

        def root(a):
            sol = optx.root_find(
                lambda y, a: jnp.tanh(y) + a * y - 1.0, optx.Newton(rtol=1e-6, atol=1e-6),
                jnp.array(0.0), a, max_steps=16,
                adjoint=loopax.optimistix.CheckpointedAdjoint(checkpoints=4),
            )
            return sol.value

        jax.grad(root)(2.0), jax.jacfwd(root)(2.0)
        ```
    """

    checkpoints: int | None = eqx.field(default=None, static=True)
    kind: Kind = eqx.field(default="checkpointed", static=True)
    base: int = eqx.field(default=16, static=True)

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

    def apply(self, primal_fn, rewrite_fn, inputs, tags):
        del rewrite_fn, tags
        loop = ft.partial(
            while_loop, kind=self.kind, checkpoints=self.checkpoints, base=self.base
        )
        return primal_fn(inputs + (loop,))
