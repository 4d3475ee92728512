"""Two processes on this machine joined with `jax.distributed` (gloo collectives on
CPU), a global mesh over their 4 devices, and a data-parallel checkpointed gradient
equal to the single-process one. Each process is bounded by a timeout."""

import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest


WORKER = pathlib.Path(__file__).with_name("_two_process_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _reference() -> np.ndarray:
    y = np.linspace(-1.0, 1.0, 16 * 8, dtype=np.float32).reshape(16, 8)
    w = np.linspace(-0.6, 0.5, 64, dtype=np.float32).reshape(8, 8)

    def loss(w):
        out = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), y, length=6)[0]
        return jnp.sum(out**2)

    return np.asarray(jax.grad(loss)(w))


def test_two_processes_data_parallel_gradient():
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT_S)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rc, _, err in outputs:
        if rc != 0:
            lowered = err.lower()
            if "gloo" in lowered and any(
                reason in lowered
                for reason in ("unknown", "not supported", "not available")
            ):
                pytest.skip(
                    f"gloo CPU collectives unavailable in this jaxlib: {err[-300:]}"
                )
            raise AssertionError(f"worker failed ({rc}):\n{err[-3000:]}")
    want = _reference().ravel()
    for _, out, _ in outputs:
        line = next(ln for ln in out.splitlines() if ln.startswith("GRAD"))
        got = np.array([float(v) for v in line.split()[2:]], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
