"""A reduced benchmark set for a machine with an accelerator, in one command.

Runs, on `jax.devices()[0]`, and marks every result with its `device_kind`:

- the RK4 neural ODE (`neural_ode.py`) at N = 1000 with checkpoints 8 and store-all
  (loopax, Equinox, `lax.scan`, `lax.scan` + per-step `jax.checkpoint`,
  `lax.while_loop` forward);
- the large state (2**20 float32, stencil body; `against_equinox.large_state`) at
  N = 1000, c = 16;
- buffer writes (`buffers.py --quick`, as a subprocess on the same device).

Budget: under 5 minutes on a GPU (most of it compilation). On a CPU it runs a smoke
version (N = 200 and large-state N = 20) so that it can be checked anywhere; `--full`
forces the GPU sizes.

Run: `python benchmarks/gpu.py [--full]`. Prints tables and writes
`benchmarks/results/gpu_<device kind>.json`.
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
from _common import RESULTS_DIR, device_kind, machine, write_json
from against_equinox import large_state, print_large
from neural_ode import print_results, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--full", action="store_true", help="GPU sizes even on a CPU (slow there)"
    )
    args = parser.parse_args()
    kind = device_kind()
    smoke = jax.devices()[0].platform == "cpu" and not args.full
    ode_steps, large_steps = (200, 20) if smoke else (1000, 1000)
    begin = time.perf_counter()
    print(f"# gpu.py on {kind} ({machine()}){' — CPU smoke sizes' if smoke else ''}")

    print(f"\n## RK4 neural ODE, N={ode_steps}, c in {{8, store-all}}", flush=True)
    ode = run(ode_steps, labels=(8, "all"), repeats=5, count=False)
    print_results(ode["rows"], ode["checks"])

    print(f"\n## large state, N={large_steps}, c=16", flush=True)
    large = large_state(large_steps, repeats=3, checkpoints=(16,))
    print_large(large)

    print("\n## buffers (buffers.py --quick)", flush=True)
    here = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, str(here / "buffers.py"), "--quick"], cwd=here, check=False
    )
    buffers = None
    if done.returncode == 0:
        buffers = json.loads((RESULTS_DIR / "buffers.json").read_text())

    elapsed = time.perf_counter() - begin
    slug = re.sub(r"[^A-Za-z0-9]+", "_", kind).strip("_").lower() or "device"
    path = write_json(
        f"gpu_{slug}",
        {
            "device_kind": kind,
            "smoke": smoke,
            "elapsed_s": elapsed,
            "neural_ode": ode,
            "large_state": large,
            "buffers": buffers
            and {
                "ratios": buffers["ratios"],
                "cpu_ratios": buffers["cpu_ratios"],
                "failures": buffers["failures"],
            },
        },
    )
    print(f"\n# {kind}: done in {elapsed:.0f} s; wrote {path}")


if __name__ == "__main__":
    main()
