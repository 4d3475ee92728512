"""Diffrax's `diffeqsolve` gradient with loopax vs Equinox's loop underneath.

Workload: a neural ODE (state 32, MLP width 64, `tanh`, plus a fixed rotation so the
solution keeps oscillating), Tsit5, `PIDController`,
`RecursiveCheckpointAdjoint(checkpoints=c)`, `SaveAt(t1=True)`, loss = sum of squares
of the final state, gradient with respect to the MLP weights and `y0`. The number of
steps is set by the controller (reported as `steps`).

Both variants are compiled in this process: "equinox" is Diffrax as installed;
"loopax" is the same function traced with `loopax.while_loop` swapped into Diffrax's
loop hooks (`equinox.internal.while_loop`, `diffrax._adjoint._inner_loop` and
`_outer_loop`, as in `docs/clients.md`). They are then timed round by round,
interleaved, and the ratio loopax / equinox of median gradient times is reported.
Target: <= 0.85 at equal checkpoints.

With `--adjoints`, the adjoint classes instead, side by side with no patching:
`loopax.diffrax.CheckpointedAdjoint(checkpoints=c)` against Diffrax's
`RecursiveCheckpointAdjoint(checkpoints=c)`, `DirectAdjoint()` and
`BacksolveAdjoint()`, on the neural ODE above (Tsit5 + PID) and on a small stiff
problem (Kvaerno5 + PID): gradient time (median of interleaved rounds), compile time
(trace + XLA), XLA temp memory; and the forward-over-reverse Hessian-vector product
against `DirectAdjoint` (loopax's temp memory at two values of `max_steps`: it should
not grow). The loopax adjoint runs twice: as default (`forward_mode=True`, a stage loop
that supports every transformation) and as `forward_mode=False` (Diffrax's default,
reverse-only stage loop). Targets: gradient <= 0.8x `RecursiveCheckpointAdjoint` and
<= 1.0x `DirectAdjoint` (median CPU time per run: on a loaded machine it is steadier
than wall time); compile time <= `RecursiveCheckpointAdjoint`'s.

Run: `python benchmarks/clients.py [--quick] [--adjoints]`
"""

import argparse
import contextlib
import importlib
import statistics
import time

import diffrax
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import machine, measure_interleaved, print_table, verdict, write_json

import loopax
import loopax.diffrax


STATE, WIDTH = 32, 64
OMEGA = 10.0  # A fixed rotation added to the MLP: keeps the solution oscillating.
TARGET = 0.85


@contextlib.contextmanager
def loopax_underneath():
    """Diffrax (and Optimistix, Lineax) run their loops on `loopax.while_loop`."""
    adjoint = importlib.import_module("diffrax._adjoint")
    saved = (eqxi.while_loop, adjoint._inner_loop, adjoint._outer_loop)
    eqxi.while_loop = loopax.while_loop
    adjoint._inner_loop = jax.named_call(loopax.while_loop, name="inner-loop")
    adjoint._outer_loop = jax.named_call(loopax.while_loop, name="outer-loop")
    jax.clear_caches()  # `diffeqsolve` is jitted: do not reuse Equinox-loop traces.
    try:
        yield
    finally:
        eqxi.while_loop, adjoint._inner_loop, adjoint._outer_loop = saved
        jax.clear_caches()


def make_problem(t1: float, rtol: float):
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(0), 4)
    params = {
        "w1": jr.normal(k1, (WIDTH, STATE)) / STATE**0.5,
        "w2": jr.normal(k2, (STATE, WIDTH)) / WIDTH**0.5,
    }
    y0 = jr.normal(k3, (STATE,))
    a = jr.normal(k4, (STATE, STATE)) / STATE**0.5
    rotation = OMEGA * (a - a.T)

    def vector_field(t, y, p):
        return p["w2"] @ jnp.tanh(p["w1"] @ y) + rotation @ y

    def solve(p, y0, checkpoints):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            t0=0.0,
            t1=t1,
            dt0=0.01,
            y0=y0,
            args=p,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol * 1e-2),
            adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints),
            max_steps=4096,
        )

    def make_grad(checkpoints):
        def loss(p, y0):
            return jnp.sum(solve(p, y0, checkpoints).ys ** 2)

        return jax.grad(loss, argnums=(0, 1))

    num_steps = int(
        jax.jit(lambda p, y: solve(p, y, None).stats["num_steps"])(params, y0)
    )
    return params, y0, make_grad, num_steps


def compile_fn(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def measure(checkpoints: int, params, y0, make_grad, repeats: int, min_time: float):
    grad = make_grad(checkpoints)
    compiled, compile_s = {}, {}
    compiled["equinox"], compile_s["equinox"] = compile_fn(grad, params, y0)
    with loopax_underneath():
        compiled["loopax"], compile_s["loopax"] = compile_fn(grad, params, y0)
    outs = {name: jax.block_until_ready(c(params, y0)) for name, c in compiled.items()}
    max_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree_util.tree_leaves(outs["loopax"]),
            jax.tree_util.tree_leaves(outs["equinox"]),
            strict=True,
        )
    )
    times = {name: [] for name in compiled}
    begin = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - begin < min_time:
        for name, c in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(c(params, y0))
            times[name].append(time.perf_counter() - start)
        rounds += 1
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "checkpoints": checkpoints,
        "equinox_s": median["equinox"],
        "loopax_s": median["loopax"],
        "ratio": median["loopax"] / median["equinox"],
        "equinox_compile_s": compile_s["equinox"],
        "loopax_compile_s": compile_s["loopax"],
        "max_abs_grad_diff": max_diff,
        "rounds": rounds,
    }


# -- the adjoint classes, side by side (`--adjoints`) ---------------------------------

STIFF_STATE = 8


def neural_ode_problem(t1: float):
    """Tsit5 + PID on the neural ODE of `make_problem`; params are the MLP weights."""
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(0), 4)
    params = {
        "w1": jr.normal(k1, (WIDTH, STATE)) / STATE**0.5,
        "w2": jr.normal(k2, (STATE, WIDTH)) / WIDTH**0.5,
    }
    y0 = jr.normal(k3, (STATE,))
    a = jr.normal(k4, (STATE, STATE)) / STATE**0.5
    rotation = OMEGA * (a - a.T)

    def vector_field(t, y, p):
        return p["w2"] @ jnp.tanh(p["w1"] @ y) + rotation @ y

    return {
        "term": diffrax.ODETerm(vector_field),
        "solver": diffrax.Tsit5(),
        "controller": diffrax.PIDController(rtol=1e-5, atol=1e-7),
        "t1": t1,
        "dt0": 0.01,
        "params": params,
        "y0": y0,
    }


def stiff_problem(t1: float):
    """Kvaerno5 + PID on `y' = -diag(lambda) y + tanh(w y)`, stiffness ratio 1e4."""
    k1, k2 = jr.split(jr.PRNGKey(1))
    decay = jnp.logspace(0.0, 4.0, STIFF_STATE)

    def vector_field(t, y, p):
        return -decay * y + jnp.tanh(p["w"] @ y)

    return {
        "term": diffrax.ODETerm(vector_field),
        "solver": diffrax.Kvaerno5(),
        "controller": diffrax.PIDController(rtol=1e-5, atol=1e-7),
        "t1": t1,
        "dt0": 1e-3,
        "params": {"w": jr.normal(k1, (STIFF_STATE, STIFF_STATE))},
        "y0": jr.normal(k2, (STIFF_STATE,)),
    }


def adjoint_loss(problem, adjoint, max_steps):
    def loss(params, y0):
        sol = diffrax.diffeqsolve(
            problem["term"],
            problem["solver"],
            t0=0.0,
            t1=problem["t1"],
            dt0=problem["dt0"],
            y0=y0,
            args=params,
            stepsize_controller=problem["controller"],
            adjoint=adjoint,
            max_steps=max_steps,
        )
        return jnp.sum(sol.ys**2)

    return loss


def hvp_of(loss):
    """Forward-over-reverse Hessian-vector product in the parameters."""

    def hvp(params, y0):
        tangent = jax.tree_util.tree_map(jnp.ones_like, params)
        grad = lambda p: jax.grad(loss)(p, y0)
        return jax.jvp(grad, (params,), (tangent,))[1]

    return hvp


def compare_adjoints(name, problem, checkpoints, max_steps, repeats, min_time):
    params, y0 = problem["params"], problem["y0"]
    steps = int(
        jax.jit(
            lambda p, y: diffrax.diffeqsolve(
                problem["term"],
                problem["solver"],
                t0=0.0,
                t1=problem["t1"],
                dt0=problem["dt0"],
                y0=y,
                args=p,
                stepsize_controller=problem["controller"],
                max_steps=max_steps,
            ).stats["num_steps"]
        )(params, y0)
    )
    adjoints = {
        "loopax": loopax.diffrax.CheckpointedAdjoint(checkpoints=checkpoints),
        "loopax_reverse_only": loopax.diffrax.CheckpointedAdjoint(
            checkpoints=checkpoints, forward_mode=False
        ),
        "recursive": diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints),
        "direct": diffrax.DirectAdjoint(),
        "backsolve": diffrax.BacksolveAdjoint(),
    }
    fns = {}
    for k, a in adjoints.items():
        fn = jax.grad(adjoint_loss(problem, a, max_steps))
        try:  # e.g. BacksolveAdjoint's backward solve may need more than `max_steps`.
            jax.block_until_ready(jax.jit(fn)(params, y0))
        except Exception as e:
            print(f"{name}: {k} failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            continue
        fns[k] = fn
    jax.clear_caches()  # Compile times are measured afresh below.
    out = measure_interleaved(fns, params, y0, repeats=repeats, min_time=min_time)
    rows = []
    for k, r in out.items():
        rows.append(
            {
                "problem": name,
                "steps": steps,
                "max_steps": max_steps,
                "what": "grad",
                "adjoint": k,
                "run_s": r["run_s"],
                "run_cpu_s": r["run_cpu_s"],
                "compile_s": r["compile_s"],
                "temp_bytes": r["temp_bytes"],
                "vs_loopax": r["run_cpu_s"] / out["loopax"]["run_cpu_s"],
            }
        )
    return rows, out


def compare_hvps(
    name, problem, checkpoints, max_steps, small_max_steps, repeats, min_time
):
    """HVP time and temp memory, loopax vs `DirectAdjoint` at `max_steps`; and loopax's
    temp memory at `small_max_steps` (compiled only), to see it does not grow."""
    params, y0 = problem["params"], problem["y0"]

    def loopax_hvp(m):
        adjoint = loopax.diffrax.CheckpointedAdjoint(checkpoints=checkpoints)
        return hvp_of(adjoint_loss(problem, adjoint, m))

    fns = {
        "loopax": loopax_hvp(max_steps),
        "direct": hvp_of(adjoint_loss(problem, diffrax.DirectAdjoint(), max_steps)),
    }
    out = measure_interleaved(fns, params, y0, repeats=repeats, min_time=min_time)
    rows = [
        {
            "problem": name,
            "max_steps": max_steps,
            "what": "hvp",
            "adjoint": k,
            "run_s": r["run_s"],
            "run_cpu_s": r["run_cpu_s"],
            "compile_s": r["compile_s"],
            "temp_bytes": r["temp_bytes"],
            "vs_loopax": r["run_cpu_s"] / out["loopax"]["run_cpu_s"],
        }
        for k, r in out.items()
    ]
    start = time.perf_counter()
    small = jax.jit(loopax_hvp(small_max_steps)).lower(params, y0).compile()
    memory = small.memory_analysis()
    rows.append(
        {
            "problem": name,
            "max_steps": small_max_steps,
            "what": "hvp (compiled only)",
            "adjoint": "loopax",
            "compile_s": time.perf_counter() - start,
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes,
        }
    )
    return rows


def _targets(name, out, variant):
    """Verdicts for one loopax variant, on median CPU time (steadier than wall time
    on a loaded machine) and on compile time."""
    rows = []
    mine = out[variant]
    for other, factor in (("recursive", 0.8), ("direct", 1.0)):
        if other not in out:
            continue
        ratio = mine["run_cpu_s"] / out[other]["run_cpu_s"]
        rows.append(
            {
                "problem": name,
                "adjoint": variant,
                "target": f"grad <= {factor}x {other}",
                "ratio": ratio,
                "met": verdict(ratio <= factor),
            }
        )
    if "recursive" in out:
        ratio = mine["compile_s"] / out["recursive"]["compile_s"]
        rows.append(
            {
                "problem": name,
                "adjoint": variant,
                "target": "compile <= recursive",
                "ratio": ratio,
                "met": verdict(ratio <= 1.0),
            }
        )
    return rows


def main_adjoints(quick: bool):
    checkpoints = 8
    repeats, min_time = (3, 0.5) if quick else (7, 2.0)
    problems = {
        "neural-ode": neural_ode_problem(1.0 if quick else 5.0),
        "stiff": stiff_problem(0.5 if quick else 2.0),
    }
    hvp_problems = ["neural-ode"] if quick else list(problems)
    print(f"{machine()}; checkpoints={checkpoints}")
    columns = [
        "problem",
        "steps",
        "max_steps",
        "what",
        "adjoint",
        "run_s",
        "run_cpu_s",
        "compile_s",
        "temp_bytes",
        "vs_loopax",
    ]
    rows, targets = [], []
    for name, problem in problems.items():
        grad_rows, out = compare_adjoints(
            name, problem, checkpoints, 4096, repeats, min_time
        )
        print_table(grad_rows, columns)
        rows += grad_rows
        for variant in ("loopax", "loopax_reverse_only"):
            targets += _targets(name, out, variant)
        if name in hvp_problems:
            hvp_rows = compare_hvps(
                name, problem, checkpoints, 4096, 256, repeats, min_time
            )
            print_table(hvp_rows, columns)
            rows += hvp_rows
            big, small = hvp_rows[0]["temp_bytes"], hvp_rows[-1]["temp_bytes"]
            targets.append(
                {
                    "problem": name,
                    "adjoint": "loopax",
                    "target": "hvp temp: max_steps 4096 vs 256",
                    "ratio": big / small if small else None,
                    "met": verdict(big <= small),
                }
            )
    print()
    print_table(targets, ["problem", "adjoint", "target", "ratio", "met"])
    path = write_json(
        "clients_adjoints", {"quick": quick, "rows": rows, "targets": targets}
    )
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one size, fewer rounds")
    parser.add_argument(
        "--adjoints", action="store_true", help="compare the adjoint classes instead"
    )
    args = parser.parse_args()
    if args.adjoints:
        main_adjoints(args.quick)
        return
    if args.quick:
        t1, rtol, grid, repeats, min_time = 2.0, 1e-5, [8], 3, 0.5
    else:
        t1, rtol, grid, repeats, min_time = 10.0, 1e-5, [4, 8, 16, 32], 7, 2.0
    params, y0, make_grad, num_steps = make_problem(t1, rtol)
    print(f"{machine()}; neural ODE state {STATE}, width {WIDTH}, {num_steps} steps")
    rows = []
    for c in grid:
        row = measure(c, params, y0, make_grad, repeats, min_time)
        row["steps"] = num_steps
        row["target"] = verdict(row["ratio"] <= TARGET)
        rows.append(row)
    print_table(
        rows,
        [
            "steps",
            "checkpoints",
            "equinox_s",
            "loopax_s",
            "ratio",
            "target",
            "equinox_compile_s",
            "loopax_compile_s",
            "max_abs_grad_diff",
        ],
    )
    path = write_json("clients", {"quick": args.quick, "target": TARGET, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
