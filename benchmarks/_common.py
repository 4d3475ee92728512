"""Shared timing and memory helpers for the benchmark scripts."""

import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp


RESULTS_DIR = Path(__file__).parent / "results"


def compile_and_time(fn, *args, repeats: int = 5, min_time: float = 0.2):
    """Compile `jax.jit(fn)` for `args`; return (compile seconds, median run seconds, temp bytes).

    Runs are repeated until `min_time` has passed (at least `repeats` times) and the
    median is reported; the first call after compiling is a warm-up and not counted.
    """
    jitted = jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = None if memory is None else memory.temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    times = []
    begin = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - begin < min_time:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compile_s, statistics.median(times), temp


def machine() -> str:
    device = jax.devices()[0]
    return f"{platform.processor() or platform.machine()}, {device.platform} ({device.device_kind}), jax {jax.__version__}"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "" if x is None else str(x)


def write_json(name: str, payload) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "results": payload}, indent=2))
    return path


def measure_interleaved(
    fns: dict, *args, repeats: int = 5, min_time: float = 0.2
) -> dict[str, dict]:
    """Compile `jax.jit(fn)` for each of `fns` on `args`, then time them round by round.

    Interleaving the competitors (one run of each per round) means a change in the
    load of a shared machine affects them alike, so their ratios stay meaningful.
    Rounds are repeated until `min_time` has passed (at least `repeats` rounds).
    Returns, per name: compile seconds, median run seconds (wall clock and process
    CPU time), the fastest run (wall clock), and XLA temp bytes
    (`memory_analysis().temp_size_in_bytes`).
    """
    compiled, out = {}, {}
    for name, fn in fns.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*args).compile()
        memory = compiled[name].memory_analysis()
        out[name] = {
            "compile_s": time.perf_counter() - start,
            "temp_bytes": None if memory is None else memory.temp_size_in_bytes,
        }
        jax.block_until_ready(compiled[name](*args))  # warm-up, not counted
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    begin = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - begin < min_time:
        for name in fns:
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(compiled[name](*args))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        rounds += 1
    for name in fns:
        out[name]["run_s"] = statistics.median(wall[name])
        out[name]["run_cpu_s"] = statistics.median(cpu[name])
        out[name]["run_min_s"] = min(wall[name])
        out[name]["rounds"] = rounds
    return out


def device_kind() -> str:
    return jax.devices()[0].device_kind


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISSED")


def mlp_params(key, state: int, width: int) -> dict:
    """Weights of the neural-ODE vector field `w2 @ tanh(w1 @ y)`, scaled to O(1)."""
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (width, state)) / state**0.5,
        "w2": jax.random.normal(k2, (state, width)) / width**0.5,
    }


def rk4_step(params: dict, y, dt: float):
    """One classical Runge–Kutta step of the neural ODE `dy/dt = w2 @ tanh(w1 @ y)`."""

    def vector_field(y):
        return params["w2"] @ jax.numpy.tanh(params["w1"] @ y)

    k1 = vector_field(y)
    k2 = vector_field(y + 0.5 * dt * k1)
    k3 = vector_field(y + 0.5 * dt * k2)
    k4 = vector_field(y + dt * k3)
    return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def stencil_grad(while_loop, num_steps: int):
    """The gradient of the large-state benchmark: `num_steps` steps of a diffusion
    stencil plus a sine term on a 1-D state, run by `while_loop(cond, body, init)`."""

    def loss(y0):
        def body(carry):
            i, y = carry
            laplacian = jnp.roll(y, 1) - 2 * y + jnp.roll(y, -1)
            return i + 1, y + 0.01 * laplacian + 0.001 * jnp.sin(y)

        return while_loop(lambda c: c[0] < num_steps, body, (0, y0))[1].sum()

    return jax.grad(loss)
