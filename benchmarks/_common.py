"""Shared timing and memory helpers for the benchmark scripts."""

import json
import platform
import statistics
import time
from pathlib import Path

import jax


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
