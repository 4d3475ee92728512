"""`python -m loopax`: the demo, and the schedule inspector.

- `python -m loopax` (or `python -m loopax demo`): differentiate a small adaptive
  neural ODE in reverse mode (`jax.grad`) three ways: the full-storage reference a
  JAX user would write (`lax.scan` over `lax.cond` up to `max_steps`, storing every
  step), `kind="checkpointed"` and `kind="bounded"`. Prints, per row: steps taken,
  states stored, body evaluations, gradient time, XLA temporary memory, and whether the
  gradient agrees with the reference; a legend for every column; and a one-line
  takeaway with the measured memory and time ratios. `kind="lax"` has no reverse mode:
  the demo shows its error. Exits with status 0 only if every gradient agrees.
- `python -m loopax schedule --steps 1000 --checkpoints 10 [--max-steps M]
  [--known-length] [--plot out.png]`: print what one gradient through a checkpointed
  loop costs (forward / recomputed / VJP / total body evaluations, recompute factor,
  peak slots used), and optionally draw the schedule (needs matplotlib).
"""

import sys


if __name__ == "__main__":
    # `python -m loopax`: say something before the slow imports and compiles.
    print("loopax demo: importing JAX ...", flush=True)

import argparse
import time

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import loopax


STATE, WIDTH, MAX_STEPS, CHECKPOINTS = 8, 32, 512, 8
_REPEATS = 20


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


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _measure(loss_fn, params, y0):
    """Compile `jax.grad(loss_fn)`; its gradient, best time (s), XLA temp bytes."""
    compiled = jax.jit(jax.grad(loss_fn)).lower(params, y0).compile()
    memory = compiled.memory_analysis()
    temp = None if memory is None else int(memory.temp_size_in_bytes)
    grads = jax.block_until_ready(compiled(params, y0))
    times = []
    for _ in range(_REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, y0))
        times.append(time.perf_counter() - start)
    # The fastest run: the least disturbed by whatever else the machine is doing.
    return grads, min(times), temp


_HEADER = ("loop", "steps", "stored", "evals", "grad time", "temp memory", "agrees")


def _legend() -> str:
    """What each column of the demo's table means."""
    return f"""\
columns:
  loop         "lax.scan reference": lax.scan over lax.cond up to max_steps={MAX_STEPS},
               what plain JAX offers for reverse mode when the trip count is unknown;
               "checkpointed", "bounded": loopax.while_loop(..., kind=...)
  steps        body calls the loop made (its trip count, decided while it runs)
  stored       loop states kept for the backward pass: the reference keeps every one
               of its max_steps={MAX_STEPS} steps, "checkpointed" at most
               checkpoints={CHECKPOINTS}, "bounded" one per level of its nested scans
  evals        body evaluations of one gradient, forward / recomputed / VJP (from
               loopax.schedule; "bounded" is not counted: -)
  grad time    one jax.grad call, compiled, the fastest of {_REPEATS}
  temp memory  XLA's temporary buffers for one gradient (memory_analysis)
  agrees       gradient equal to the reference's (rtol 1e-4)"""


def demo() -> int:
    params, y0, loss, reference_loop = _make_problem()
    rows_options = {
        "lax.scan reference": None,
        "checkpointed": dict(kind="checkpointed", checkpoints=CHECKPOINTS),
        "bounded": dict(kind="bounded", max_steps=MAX_STEPS),
    }
    print(
        f"loopax {loopax.__version__} demo: jax.grad through a neural ODE (state "
        f"{STATE}, width {WIDTH}) with adaptive steps, so the trip count is known only "
        "at run time"
    )
    results = {}
    expected = None
    for name, options in rows_options.items():
        sys.stdout.write(f"  compiling and timing {name} ... ")
        sys.stdout.flush()
        while_loop = _loop(options, reference_loop)

        grads, seconds, temp = _measure(
            lambda p, y, wl=while_loop: loss(wl, p, y)[0], params, y0
        )
        steps = int(jax.jit(lambda p, y, wl=while_loop: loss(wl, p, y)[1])(params, y0))
        if expected is None:
            expected = grads
        ok = all(
            np.allclose(a, b, rtol=1e-4, atol=1e-5)
            for a, b in zip(
                jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True
            )
        )
        results[name] = (steps, seconds, temp, ok)
        print("done")

    rows = []
    for name, (steps, seconds, temp, ok) in results.items():
        if name == "checkpointed":
            plan = loopax.schedule(steps, CHECKPOINTS)
            evals = f"{plan.num_forward}/{plan.num_recomputed}/{plan.num_vjp}"
            stored = str(min(CHECKPOINTS, steps))
        elif name == "bounded":
            evals, stored = "-", "per level"
        else:  # Every step of the scan runs (a no-op `cond` past the trip count).
            evals, stored = f"{MAX_STEPS}/0/{MAX_STEPS}", str(MAX_STEPS)
        rows.append(
            (
                name,
                str(steps),
                stored,
                evals,
                f"{seconds * 1e3:.2f} ms",
                _bytes(temp),
                "yes" if ok else "NO",
            )
        )
    header = _HEADER
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    print(_legend())
    print()
    _show_lax_error(loss, params, y0)
    all_ok = all(ok for *_, ok in results.values())
    _, ref_time, ref_temp, _ = results["lax.scan reference"]
    _, ck_time, ck_temp, _ = results["checkpointed"]
    if ref_temp and ck_temp:
        print(
            f"takeaway: kind='checkpointed' gives the same gradient in {_bytes(ck_temp)} "
            f"of temporary memory instead of {_bytes(ref_temp)} "
            f"({ref_temp / ck_temp:.0f}x less) and {ck_time / ref_time:.2f}x the time "
            f"of the full-storage reference (which runs all {MAX_STEPS} steps, as it "
            "cannot know the trip count in advance)."
        )
    print(
        "all gradients agree with the full-storage reference"
        if all_ok
        else "GRADIENT MISMATCH"
    )
    return 0 if all_ok else 1


def _loop(options: dict | None, reference_loop):
    """The loop of one row: `loopax.while_loop(..., **options)`, or the reference."""
    if options is None:
        return reference_loop

    def while_loop(cond_fun, body_fun, init_val):
        return loopax.while_loop(cond_fun, body_fun, init_val, **options)

    return while_loop


def _show_lax_error(loss, params, y0) -> None:
    """`kind="lax"` is forward mode only: show the error `jax.grad` gives."""

    def while_loop(c, b, x):
        return loopax.while_loop(c, b, x, kind="lax")

    try:
        jax.grad(lambda p: loss(while_loop, p, y0)[0])(params)
    except ValueError as e:
        first = str(e).split(". ")[0]
        print(f"kind='lax' (a plain lax.while_loop) has no reverse mode: {first}.")
    else:  # pragma: no cover - the error is part of loopax's contract.
        print("kind='lax' unexpectedly differentiated in reverse mode")


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
