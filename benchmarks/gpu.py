"""The benchmark set for a machine with an accelerator (issue #21), in one command.

Runs on `jax.devices()[0]` and records with every result the device kind, the run
time (median of interleaved rounds), the XLA temp memory of the compiled function and
its compile time:

1. RK4 neural ODE (state 64, width 128; `neural_ode.py`) at N = 1000 and 10000:
   gradient with c = 8, 32, the default and store-all, vs Equinox's checkpointed
   loop at the same c, `lax.scan` (full storage) and `lax.scan` with a per-step
   `jax.checkpoint`; forward vs `lax.while_loop`.
2. Large state: 2**24 float32 (64 MiB), stencil body, gradient at c = 4 and 16 vs
   Equinox; temp memory in carries.
3. Buffer writes (`buffers.py --quick`, as a subprocess on the same device).
4. Tiny body (16 -> 64 -> 16 MLP, explicit Euler): gradient per body evaluation vs
   `lax.scan` (full storage).
5. `vmap` with per-example stop steps: gradient of a batch of 64 ODEs stopping at
   different steps, loopax vs Equinox.

Targets (checked and printed as PASS / MISSED):
- gradient loopax / Equinox <= 0.8 at c = 8 and 32 (ODE);
- store-all gradient / `lax.scan` <= 1.15 (ODE);
- forward / `lax.while_loop` <= 1.02 (ODE);
- tiny-body gradient time per body evaluation <= 1.3 x `lax.scan`'s;
- large-state temp memory <= (c + 3) carries.

Budget: under 8 minutes on a GPU (most of it compilation). `--smoke` runs tiny sizes
(N = 20, a 2**12 large state, batch 4) so the whole script can be checked on a CPU in
under a minute; on a CPU without `--smoke` it runs the GPU sizes (slow).

Run: `python benchmarks/gpu.py [--smoke]`. Prints tables and writes
`benchmarks/results/gpu_<device kind>.json` (`gpu_smoke_<kind>.json` with `--smoke`).
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    RESULTS_DIR,
    device_kind,
    machine,
    measure_interleaved,
    mlp_params,
    print_table,
    stencil_grad,
    verdict,
    write_json,
)
from neural_ode import print_results, run

import loopax


GRAD_TARGET = 0.8
STORE_ALL_TARGET = 1.15
FORWARD_TARGET = 1.02
TINY_PER_EVALUATION_TARGET = 1.3


def neural_ode(num_steps: int, labels, repeats: int) -> dict:
    """Section 1: `neural_ode.run`, plus the targets at c = 8 and 32."""
    out = run(num_steps, labels=labels, repeats=repeats, min_time=0.0, count=False)
    rows = {(r["group"], r["variant"]): r for r in out["rows"]}
    checks = []
    for c in (8, 32):
        ours, theirs = (
            rows.get(("grad", f"loopax c={c}")),
            rows.get(("grad", f"equinox c={c}")),
        )
        if ours is None or theirs is None:
            continue
        ratio = ours["run_s"] / theirs["run_s"]
        checks.append(
            {
                "N": num_steps,
                "target": f"grad loopax / equinox c={c} <= {GRAD_TARGET}",
                "value": ratio,
                "status": verdict(ratio <= GRAD_TARGET),
            }
        )
    out["checks"] = [
        c
        for c in out["checks"]
        if "no target" not in c["target"] and "<= 0.8" not in c["target"]
    ] + checks
    return out


def large_state(size: int, num_steps: int, repeats: int, checkpoints=(4, 16)):
    """Section 2: a cheap stencil body on a large state; time and temp memory."""
    carry_bytes = 4 * size + 4

    def make(while_loop):
        return stencil_grad(while_loop, num_steps)

    y0 = jnp.ones(size)
    rows = []
    for c in checkpoints:
        out = measure_interleaved(
            {
                "loopax": make(
                    lambda cf, b, x, c=c: loopax.while_loop(cf, b, x, checkpoints=c)
                ),
                "equinox": make(
                    lambda cf, b, x, c=c: eqxi.while_loop(
                        cf, b, x, kind="checkpointed", checkpoints=c
                    )
                ),
            },
            y0,
            repeats=repeats,
            min_time=0.0,
        )
        ours, theirs = out["loopax"], out["equinox"]
        temp = ours["temp_bytes"]
        rows.append(
            {
                "checkpoints": c,
                "num_steps": num_steps,
                "loopax_s": ours["run_s"],
                "equinox_s": theirs["run_s"],
                "time_ratio": ours["run_s"] / theirs["run_s"],
                "loopax_compile_s": ours["compile_s"],
                "equinox_compile_s": theirs["compile_s"],
                "loopax_temp_carries": None if temp is None else temp / carry_bytes,
                "equinox_temp_carries": None
                if theirs["temp_bytes"] is None
                else theirs["temp_bytes"] / carry_bytes,
                "bound_c_plus_3": c + 3,
                "status": verdict(
                    None if temp is None else temp <= (c + 3) * carry_bytes
                ),
            }
        )
    return rows


def tiny_body(num_steps: int, repeats: int, checkpoints=(8, "all")):
    """Section 4: a 16 -> 64 -> 16 MLP body; gradient time per body evaluation."""
    params = mlp_params(jr.PRNGKey(1), 16, 64)
    y0 = jr.normal(jr.PRNGKey(2), (16,))
    dt = 1.0 / num_steps

    def advance(p, y):
        return y + dt * (p["w2"] @ jnp.tanh(p["w1"] @ y))

    def while_loss(c, max_steps):
        def loss(p, y):
            def body(carry):
                i, y = carry
                return i + 1, advance(p, y)

            _, y = loopax.while_loop(
                lambda carry: carry[0] < num_steps,
                body,
                (jnp.int32(0), y),
                checkpoints=c,
                max_steps=max_steps,
            )
            return jnp.sum(y**2)

        return loss

    def scan_loss(p, y):
        y, _ = lax.scan(lambda y, _: (advance(p, y), None), y, None, length=num_steps)
        return jnp.sum(y**2)

    fns, evaluations = {"lax.scan": jax.grad(scan_loss)}, {"lax.scan": 2 * num_steps}
    for c in checkpoints:
        if c == "all":
            fns["loopax store-all"] = jax.grad(while_loss(num_steps, num_steps))
            evaluations["loopax store-all"] = 2 * num_steps
        else:
            fns[f"loopax c={c}"] = jax.grad(while_loss(c, None))
            plan = loopax.schedule(num_steps, c)
            evaluations[f"loopax c={c}"] = plan.total_evaluations
    out = measure_interleaved(fns, params, y0, repeats=repeats, min_time=0.0)
    scan_each = out["lax.scan"]["run_s"] / evaluations["lax.scan"]
    rows = []
    for name, r in out.items():
        each = r["run_s"] / evaluations[name]
        ratio = each / scan_each
        rows.append(
            {
                "variant": name,
                "N": num_steps,
                "run_s": r["run_s"],
                "compile_s": r["compile_s"],
                "temp_bytes": r["temp_bytes"],
                "evaluations": evaluations[name],
                "per_evaluation/scan": ratio,
                "status": "-"
                if name == "lax.scan"
                else verdict(ratio <= TINY_PER_EVALUATION_TARGET),
            }
        )
    return rows


def vmap_stopping(num_steps: int, batch: int, repeats: int, checkpoints: int = 8):
    """Section 5: a batch of ODEs, example `b` stopping after a different step count."""
    params = mlp_params(jr.PRNGKey(3), 16, 64)
    y0 = jr.normal(jr.PRNGKey(4), (batch, 16))
    stops = jnp.linspace(num_steps // 2, num_steps, batch).astype(jnp.int32)
    dt = 1.0 / num_steps

    def make(while_loop):
        def loss(p, y0):
            def one(y, stop):
                def body(carry):
                    i, y = carry
                    return i + 1, y + dt * (p["w2"] @ jnp.tanh(p["w1"] @ y))

                _, y = while_loop(
                    lambda carry: carry[0] < stop, body, (jnp.int32(0), y)
                )
                return jnp.sum(y**2)

            return jnp.sum(jax.vmap(one)(y0, stops))

        return jax.grad(loss)

    out = measure_interleaved(
        {
            "loopax": make(
                lambda c, b, x: loopax.while_loop(c, b, x, checkpoints=checkpoints)
            ),
            "equinox": make(
                lambda c, b, x: eqxi.while_loop(
                    c, b, x, kind="checkpointed", checkpoints=checkpoints
                )
            ),
        },
        params,
        y0,
        repeats=repeats,
        min_time=0.0,
    )
    return [
        {
            "variant": name,
            "N": num_steps,
            "batch": batch,
            "checkpoints": checkpoints,
            "run_s": r["run_s"],
            "compile_s": r["compile_s"],
            "temp_bytes": r["temp_bytes"],
            "time/equinox": r["run_s"] / out["equinox"]["run_s"],
        }
        for name, r in out.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the script (CPU)"
    )
    args = parser.parse_args()
    kind = device_kind()
    smoke = args.smoke
    if smoke:
        ode_sizes, ode_labels, repeats = [20], (8, "all"), 1
        large_size, large_steps, tiny_steps, vmap_batch = 2**12, 10, 50, 4
    else:
        ode_sizes, ode_labels, repeats = [1000, 10000], ("default", 8, 32, "all"), 5
        large_size, large_steps, tiny_steps, vmap_batch = 2**24, 200, 10000, 64
    begin = time.perf_counter()
    print(f"# gpu.py on {kind} ({machine()}){' — smoke sizes' if smoke else ''}")
    results = {"device_kind": kind, "smoke": smoke}

    results["neural_ode"] = []
    for n in ode_sizes:
        print(f"\n## 1. RK4 neural ODE, N={n}, c in {ode_labels}", flush=True)
        ode = neural_ode(n, ode_labels, repeats)
        print_results(ode["rows"], ode["checks"])
        results["neural_ode"].append(ode)

    print(f"\n## 2. large state 2**{large_size.bit_length() - 1} float32", flush=True)
    results["large_state"] = large_state(large_size, large_steps, max(repeats, 2))
    print_table(results["large_state"], list(results["large_state"][0]))

    print("\n## 3. buffers (buffers.py --quick)", flush=True)
    if smoke:
        print("skipped with --smoke")
        results["buffers"] = None
    else:
        here = Path(__file__).parent
        done = subprocess.run(
            [sys.executable, str(here / "buffers.py"), "--quick"],
            cwd=here,
            check=False,
        )
        buffers = None
        if done.returncode == 0:
            buffers = json.loads((RESULTS_DIR / "buffers.json").read_text())
            buffers = {
                "ratios": buffers["ratios"],
                "cpu_ratios": buffers["cpu_ratios"],
                "failures": buffers["failures"],
            }
        results["buffers"] = buffers

    print(f"\n## 4. tiny body, N={tiny_steps}", flush=True)
    results["tiny_body"] = tiny_body(tiny_steps, repeats)
    print_table(results["tiny_body"], list(results["tiny_body"][0]))

    print(f"\n## 5. vmap with per-example stops, batch {vmap_batch}", flush=True)
    results["vmap_stopping"] = vmap_stopping(tiny_steps, vmap_batch, repeats)
    print_table(results["vmap_stopping"], list(results["vmap_stopping"][0]))

    elapsed = time.perf_counter() - begin
    results["elapsed_s"] = elapsed
    slug = re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_").lower() or "device"
    path = write_json(f"gpu_{'smoke_' if smoke else ''}{slug}", results)
    print(f"\n# {kind}: done in {elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
