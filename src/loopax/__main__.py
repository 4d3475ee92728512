"""`python -m loopax`: the demo, and the schedule inspector.

- `python -m loopax` (or `python -m loopax demo`): differentiate a small adaptive
  neural ODE with every kind. Prints, per kind: steps taken, checkpoints, body
  evaluations (forward / recomputed / VJP), gradient time, XLA temp memory, and
  whether the gradient agrees with a full-storage reference (`lax.scan` over
  `lax.cond`). Exits with status 0 only if every gradient agrees.
- `python -m loopax schedule --steps 1000 --checkpoints 10 [--max-steps M]
  [--known-length] [--plot out.png]`: print what one gradient through a checkpointed
  loop costs (forward / recomputed / VJP / total body evaluations, recompute factor,
  peak slots used), and optionally draw the schedule (needs matplotlib).
"""

import argparse
import sys
import time

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import loopax


STATE, WIDTH, MAX_STEPS, CHECKPOINTS = 8, 32, 512, 8


def _make_problem():
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    params = (
        jr.normal(k1, (WIDTH, STATE)) / STATE**0.5,
        jr.normal(k2, (STATE, WIDTH)) / WIDTH**0.5,
    )
    y0 = jr.normal(k3, (STATE,))

    def vector_field(p, y):
        return p[1] @ jnp.tanh(p[0] @ y)

    def cond(carry):
        t, _, _ = carry
        return t < 1.0

    def body(p):
        def step(carry):
            # Adaptive step: smaller where the vector field is large, so the number of
            # steps depends on the parameters and the initial state.
            t, y, n = carry
            f = vector_field(p, y)
            dt = jnp.minimum(0.02 / (1.0 + jnp.linalg.norm(f)), 1.0 - t)
            dt = lax.stop_gradient(dt)
            y = y + dt * vector_field(p, y + 0.5 * dt * f)  # Midpoint rule.
            return t + dt, y, n + 1

        return step

    def loss(while_loop, p, y0):
        _, y, n = while_loop(cond, body(p), (jnp.array(0.0), y0, jnp.array(0)))
        return jnp.sum(y**2), n

    def reference_loop(cond_fun, body_fun, init):
        def step(carry, _):
            return lax.cond(cond_fun(carry), body_fun, lambda c: c, carry), None

        return lax.scan(step, init, None, length=MAX_STEPS)[0]

    return params, y0, loss, reference_loop


def demo() -> int:
    params, y0, loss, reference_loop = _make_problem()
    kinds = {
        "lax (jacfwd)": dict(kind="lax"),
        "checkpointed": dict(kind="checkpointed", checkpoints=CHECKPOINTS),
        "bounded": dict(kind="bounded", max_steps=MAX_STEPS),
    }
    print(
        f"loopax {loopax.__version__} demo: neural ODE (state {STATE}, width {WIDTH}), adaptive steps"
    )
    sys.stdout.write("compiling the reference ")
    sys.stdout.flush()
    ref_grad = jax.jit(jax.grad(lambda p, y: loss(reference_loop, p, y)[0]))
    expected = ref_grad(params, y0)
    print("done")
    rows, all_ok = [], True
    for name, options in kinds.items():
        sys.stdout.write(f"compiling {name} ... ")
        sys.stdout.flush()

        def while_loop(c, b, x, options=options):
            return loopax.while_loop(c, b, x, **options)

        value = lambda p, y, wl=while_loop: loss(wl, p, y)[0]
        if options["kind"] == "lax":
            grad_fn = jax.jacfwd(value)
        else:
            grad_fn = jax.grad(value)
        compiled = jax.jit(grad_fn).lower(params, y0).compile()
        memory = compiled.memory_analysis()
        temp = None if memory is None else memory.temp_size_in_bytes
        jax.block_until_ready(compiled(params, y0))
        start = time.perf_counter()
        grads = jax.block_until_ready(compiled(params, y0))
        elapsed = time.perf_counter() - start
        print("done")
        steps = int(jax.jit(lambda p, y, wl=while_loop: loss(wl, p, y)[1])(params, y0))
        ok = all(
            np.allclose(a, b, rtol=1e-4, atol=1e-5)
            for a, b in zip(
                jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True
            )
        )
        all_ok &= ok
        if options["kind"] == "checkpointed":
            plan = loopax.schedule(steps, CHECKPOINTS)
            evals = f"{plan.num_forward}/{plan.num_recomputed}/{plan.num_vjp}"
            ckpt = str(CHECKPOINTS)
        else:
            evals, ckpt = "-", "-"
        rows.append(
            (
                name,
                str(steps),
                ckpt,
                evals,
                f"{elapsed * 1e3:.2f} ms",
                str(temp),
                "yes" if ok else "NO",
            )
        )
    header = (
        "kind",
        "steps",
        "checkpoints",
        "evals fwd/recomp/vjp",
        "grad time",
        "temp bytes",
        "agrees",
    )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    print(
        "all gradients agree with the full-storage reference"
        if all_ok
        else "GRADIENT MISMATCH"
    )
    return 0 if all_ok else 1


def schedule_command(args: argparse.Namespace) -> int:
    try:
        plan = loopax.schedule(
            args.steps,
            args.checkpoints,
            max_steps=args.max_steps,
            known_length=args.known_length,
        )
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.render(timeline=args.timeline))
    if args.plot is not None:
        try:
            plan.plot(args.plot)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.plot}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loopax",
        description="loopax: differentiable while loops for JAX. Without a command, "
        "runs the demo.",
    )
    commands = parser.add_subparsers(dest="command")
    commands.add_parser(
        "demo", help="differentiate a small adaptive neural ODE with every kind"
    )
    sched = commands.add_parser(
        "schedule",
        help="print the cost of one gradient through a checkpointed loop",
        description="Replay the checkpointing schedule of one gradient through "
        "loopax.while_loop(..., kind='checkpointed') (or loopax.scan with "
        "--known-length) and print its cost.",
    )
    sched.add_argument("--steps", type=int, required=True, help="trip count n")
    sched.add_argument(
        "--checkpoints", type=int, required=True, help="number of checkpoint slots"
    )
    sched.add_argument(
        "--max-steps", type=int, default=None, help="the loop's max_steps bound"
    )
    sched.add_argument(
        "--known-length",
        action="store_true",
        help="trip count known up front (loopax.scan, loopax.fori_loop)",
    )
    sched.add_argument(
        "--timeline",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print every action (default: only for short schedules)",
    )
    sched.add_argument(
        "--plot", metavar="PATH", default=None, help="draw the schedule into PATH"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "schedule":
        return schedule_command(args)
    return demo()


if __name__ == "__main__":
    sys.exit(main())
