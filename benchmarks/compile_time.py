"""Compile time of gradients through checkpointed loops: loopax against Equinox.

Users of checkpointed loops wait for compiles more than for runs (Diffrax issue 94;
jaxley issue 55). This script splits the time to a runnable gradient into its three
stages, each measured with JAX's caches cleared, alternating loopax and Equinox,
medians of `--rounds` rounds:

- **trace**: Python tracing to a jaxpr, including every custom rule (jvp, partial
  evaluation, transpose) — `jax.jit(f).trace(*args)`;
- **lower**: jaxpr to StableHLO — `.lower()` (with loopax, this builds the
  trace-time table of online decisions; its cache is cleared too);
- **compile**: XLA's optimisation and code generation — `.compile()`.

Each stage is timed twice: wall clock, and the process's CPU time (`*_cpu_s`). Pinned
to one core (`taskset -c 1`) on a shared machine, the wall clock counts the time other
processes hold the core; the CPU time does not, so its ratios stay meaningful under
load (the compile is single-threaded there). Rounds alternate the libraries' order.

It also reports the optimized HLO's size (instructions), how many copies of the
loop body it holds (counted by the body's distinctive `tanh`: one per RK4 stage, so
copies = tanh count / 4) and, with `--kernels`, the number of LLVM kernels XLA:CPU
compiles and their LLVM seconds (from XLA's log, in a subprocess per case). On
XLA:CPU the compile time is roughly proportional to the number of kernels: every
fusion, and every small `dot` (emitted as its own loop nest), is a separately
compiled LLVM module (~5-15 ms each on this machine), so a computation costs compile
time by the kernels it adds, not by its instructions.

Workload: the RK4 neural ODE (state 64, MLP width 128, N = 1000 steps) of
`against_equinox.py`, first order (gradient) at c = 8, 32, 128 and store-all, and
second order (gradient of the gradient's norm) at c = 8, both reverse over reverse
(`grad` of `grad`) and forward over reverse (`jvp` of `grad`: the same numbers).

With Diffrax installed (the `clients` extra) it also compiles the gradient of a
Diffrax neural ODE (Tsit5 + PID, state 64, MLP width 128, Diffrax's default
`max_steps=4096`) with `loopax.diffrax.CheckpointedAdjoint(forward_mode=False)` against
Diffrax's own `RecursiveCheckpointAdjoint` (Equinox's loop underneath), both with
Diffrax's default checkpoints (case "diffrax"; the like-for-like comparison: both
reverse-only), and with the default `CheckpointedAdjoint()` ("diffrax, forward_mode":
every transformation, its Runge-Kutta stages in a `"bounded"` loop). Diffrax evaluates
a step's stages in a loop, so "body copies" counts the vector field's `tanh`s, one per
copy of the step (the first step-size guess adds one).

Run: `python benchmarks/compile_time.py [--quick] [--rounds R] [--kernels]`.
"""

import argparse
import functools as ft
import os
import re
import statistics
import subprocess
import sys
import time

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from _common import machine, mlp_params, print_table, rk4_step, write_json

import loopax
from loopax._schedule.counts import online_table


STATE, WIDTH, NUM_STEPS = 64, 128, 1000


def make_loss(while_loop, **loop_kwargs):
    dt = 1.0 / NUM_STEPS
    t1 = 1.0 - 0.5 * dt

    def loss(p, y0):
        def body(carry):
            t, y = carry
            return t + dt, rk4_step(p, y, dt)

        _, y = while_loop(
            lambda c: c[0] < t1, body, (jnp.array(0.0), y0), **loop_kwargs
        )
        return jnp.sum(y**2)

    return loss


def loss_for(library: str, checkpoints):
    if library == "loopax":
        return make_loss(loopax.while_loop, checkpoints=checkpoints)
    return make_loss(
        eqxi.while_loop,
        kind="checkpointed",
        checkpoints=checkpoints,
        max_steps=NUM_STEPS,
    )


def diffrax_loss(library: str, forward_mode: bool = False):
    """The gradient's loss through a Diffrax solve, or None without Diffrax."""
    try:
        import diffrax

        import loopax.diffrax
    except ImportError:
        return None
    if library == "loopax":
        adjoint = loopax.diffrax.CheckpointedAdjoint(forward_mode=forward_mode)
    else:
        adjoint = diffrax.RecursiveCheckpointAdjoint()

    def loss(p, y0):
        def vector_field(t, y, p):
            return p["w2"] @ jnp.tanh(p["w1"] @ y)

        solution = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field),
            diffrax.Tsit5(),
            0.0,
            1.0,
            0.01,
            y0,
            args=p,
            stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-7),
            adjoint=adjoint,
        )
        return jnp.sum(solution.ys**2)

    return loss


# Diffrax evaluates a Runge-Kutta step's stages in a loop: one `tanh` per copy.
DIFFRAX_TANH_PER_BODY = 1


def first_order(loss):
    return jax.grad(loss, argnums=(0, 1))


def second_order(loss):
    def grad_norm(p, y):
        g = jax.grad(loss, argnums=1)(p, y)
        return jnp.sum(g**2)

    return jax.grad(grad_norm, argnums=0)


def second_order_forward_over_reverse(loss):
    """`second_order`'s gradient, by forward over reverse: the gradient of
    `|g|^2`, `g = grad_y L`, is `2 H_py g`, the derivative of `grad_p L` along `g`."""

    def grad_of_grad_norm(p, y):
        g = jax.grad(loss, argnums=1)(p, y)
        grad_p = ft.partial(jax.grad(loss, argnums=0), p)
        return jax.tree.map(lambda t: 2 * t, jax.jvp(grad_p, (y,), (g,))[1])

    return grad_of_grad_norm


def stages(fn, args, tanh_per_body: int = 4) -> dict:
    """Seconds per stage (wall clock and CPU) with cold caches, and the optimized
    HLO's size."""
    jax.clear_caches()
    # And loopax's trace-time table of online decisions, built once per process.
    online_table.cache_clear()
    clocks = [(time.perf_counter(), time.process_time())]
    traced = jax.jit(fn).trace(*args)
    clocks.append((time.perf_counter(), time.process_time()))
    lowered = traced.lower()
    clocks.append((time.perf_counter(), time.process_time()))
    compiled = lowered.compile()
    clocks.append((time.perf_counter(), time.process_time()))
    hlo = compiled.as_text() or ""
    out = {}
    stage_names = ("trace", "lower", "compile")
    for clock, suffix in ((0, "_s"), (1, "_cpu_s")):
        for i, stage in enumerate(stage_names):
            out[stage + suffix] = clocks[i + 1][clock] - clocks[i][clock]
        out["total" + suffix] = clocks[-1][clock] - clocks[0][clock]
    out["hlo_instructions"] = sum(1 for line in hlo.splitlines() if " = " in line)
    out["body_copies"] = hlo.count(" tanh(") / tanh_per_body
    return out


_KERNEL_LOG = re.compile(r"Compiled LLVM module: \S+ time: ([\d.]+) (s|ms|us) ")
_MARK = "@@ compile_time: kernels from here"


def kernels(order: str, checkpoints: int, library: str) -> dict:
    """The LLVM kernels XLA:CPU compiles for one case, and their LLVM seconds, read
    from XLA's log in a fresh process (the log must be configured before jax loads)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="ir_compiler=1")
    probe = [sys.executable, __file__, "--probe", order, str(checkpoints), library]
    log = subprocess.run(probe, env=env, capture_output=True, text=True).stderr
    times = [
        float(m[1]) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m[2]]
        for m in _KERNEL_LOG.finditer(log.partition(_MARK)[2])
    ]
    return dict(kernels=len(times), llvm_s=sum(times))


_TRANSFORMS = {
    "grad": first_order,
    "grad of grad": second_order,
    "jvp of grad": second_order_forward_over_reverse,
}


def case_fn(order: str, checkpoints: int, library: str):
    """The function compiled for one case: "diffrax" is the Diffrax gradient."""
    if order.startswith("diffrax"):
        forward_mode = order == "diffrax, forward_mode"
        return first_order(diffrax_loss(library, forward_mode))
    return _TRANSFORMS[order](loss_for(library, checkpoints))


def probe(order: str, checkpoints: int, library: str):
    """Compile one case once (run by `kernels` in a subprocess)."""
    params = mlp_params(jr.PRNGKey(0), STATE, WIDTH)
    y0 = jr.normal(jr.PRNGKey(1), (STATE,))
    lowered = jax.jit(case_fn(order, checkpoints, library)).lower(params, y0)
    print(_MARK, file=sys.stderr, flush=True)
    lowered.compile()


def main(quick: bool, rounds: int, with_kernels: bool):
    params = mlp_params(jr.PRNGKey(0), STATE, WIDTH)
    y0 = jr.normal(jr.PRNGKey(1), (STATE,))
    args = (params, y0)
    cases = [("grad", c) for c in (8, 32, 128, NUM_STEPS)]
    cases += [("grad of grad", 8), ("jvp of grad", 8)]
    if quick:
        cases = [cases[0], *cases[-2:]]
    if diffrax_loss("loopax") is not None:
        cases += [("diffrax", None), ("diffrax, forward_mode", None)]
    rows = []
    for order, c in cases:
        # Equinox's checkpointed loop is a `custom_vjp`: no second order.
        libraries = (
            ["loopax", "equinox"] if order in ("grad", "diffrax") else ["loopax"]
        )
        tanh_per_body = DIFFRAX_TANH_PER_BODY if order.startswith("diffrax") else 4
        samples = {library: [] for library in libraries}
        for r in range(rounds):
            # Alternate, in turn in both orders, so drift hits both alike.
            for library in libraries if r % 2 == 0 else libraries[::-1]:
                fn = case_fn(order, c, library)
                samples[library].append(stages(fn, args, tanh_per_body))
        medians = {
            lib: {k: statistics.median(s[k] for s in ss) for k in ss[0]}
            for lib, ss in samples.items()
        }
        for library, m in medians.items():
            reference = medians.get("equinox")
            if with_kernels:
                m.update(kernels(order, c, library))
            rows.append(
                dict(
                    order=order,
                    checkpoints="all" if c == NUM_STEPS else c or "default",
                    library=library,
                    **{k: round(v, 3) for k, v in m.items()},
                    vs_equinox=None
                    if reference is None
                    else round(m["total_s"] / reference["total_s"], 2),
                    cpu_vs_equinox=None
                    if reference is None
                    else round(m["total_cpu_s"] / reference["total_cpu_s"], 2),
                )
            )
    print(f"# compile time, {machine()}, N = {NUM_STEPS}, medians of {rounds}")
    print_table(
        rows,
        [
            "order",
            "checkpoints",
            "library",
            "trace_s",
            "lower_s",
            "compile_s",
            "total_s",
            "vs_equinox",
            "compile_cpu_s",
            "total_cpu_s",
            "cpu_vs_equinox",
            "hlo_instructions",
            "body_copies",
            *(["kernels", "llvm_s"] if with_kernels else []),
        ],
    )
    write_json("compile_time", dict(rows=rows, rounds=rounds))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--kernels", action="store_true", help="count XLA:CPU's LLVM kernels per case"
    )
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe_order, probe_c, probe_library = args.probe
        probe(probe_order, int(probe_c) if probe_c != "None" else None, probe_library)
    else:
        main(args.quick, args.rounds, args.kernels)
