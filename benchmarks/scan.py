"""What does a gradient through `loopax.scan(checkpoints=c)` cost, against the usual
ways of checkpointing a `lax.scan`?

Question: for a small MLP step (state 16, hidden 64) scanned n in {1000, 10000} times
(quick: 1000), the grad time, compile time and XLA temp memory of

- `lax.scan` (stores every step's residuals),
- `lax.scan` with `jax.checkpoint` around the step (stores every carry),
- a two-level nested scan: an outer `lax.scan` over K chunks with `jax.checkpoint`
  around an inner `lax.scan` of m = n / K steps (K = m = sqrt(n) where possible),
- `loopax.scan(checkpoints=c)` for c = K (the nested scan's stored carries), c = K + m
  (its peak: K carries plus one chunk's m step residuals), and the default c,

with the body evaluations of each. Evaluations are counted as revolve counts them (a
VJP of one step, the reverse step, is one evaluation; it includes that step's
forward): `lax.scan` and per-step `jax.checkpoint` 2n; the nested scan n (sweep) +
(n - K) (recomputing each chunk, storing its states as residuals) + n = 3n - K;
`loopax.scan` n + t(n + 1, c + 1) (`loopax.schedule(n, c, known_length=True)`). In
JAX the nested scan's reverse steps reuse the residuals of the recomputation and run
only the linear part; loopax's VJPs run the step's forward again.

Targets (issue 5): at equal memory (same number of stored carries) fewer body
evaluations than the nested scan; grad time / `lax.scan`'s <= 1.1 x (evaluations /
`lax.scan`'s evaluations).

Run: `python benchmarks/scan.py [--quick]`. Prints a table and writes
`benchmarks/results/scan.json`.
"""

import argparse
import math

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
from _common import compile_and_time, machine, print_table, write_json

import loopax
from loopax._schedule import default_checkpoints


STATE, HIDDEN = 16, 64


def init_params(key):
    # `STATE` and `HIDDEN` may be changed by `--state` / `--hidden`.
    k1, k2, k3 = jr.split(key, 3)
    return (
        jr.normal(k1, (HIDDEN, STATE)) / math.sqrt(STATE),
        jr.normal(k2, (HIDDEN,)) * 0.1,
        jr.normal(k3, (STATE, HIDDEN)) / math.sqrt(HIDDEN),
    )


def step(params, h, _):
    w1, b1, w2 = params
    h = h + 0.05 * (w2 @ jnp.tanh(w1 @ h + b1))
    return h, h[0]


def loss_from(final, ys):
    return jnp.sum(final**2) + jnp.sum(ys)


def lax_scan_loss(params, h, n):
    return loss_from(*lax.scan(lambda c, x: step(params, c, x), h, None, length=n))


def checkpoint_per_step_loss(params, h, n):
    body = jax.checkpoint(lambda c, x: step(params, c, x))
    return loss_from(*lax.scan(body, h, None, length=n))


def nested_loss(params, h, n, chunks):
    """Two-level checkpointing: outer scan over `chunks` chunks, `jax.checkpoint`
    around the inner scan of `n // chunks` steps."""
    m = n // chunks

    @jax.checkpoint
    def chunk(c, _):
        return lax.scan(lambda c, x: step(params, c, x), c, None, length=m)

    final, ys = lax.scan(chunk, h, None, length=chunks)
    return loss_from(final, ys.reshape(n))


def loopax_loss(params, h, n, checkpoints):
    carry, ys = loopax.scan(
        lambda c, x: step(params, c, x), h, None, length=n, checkpoints=checkpoints
    )
    return loss_from(carry, ys)


def chunking(n: int) -> tuple[int, int]:
    """(K chunks, m steps each), K * m = n, K as close to sqrt(n) as possible."""
    k = min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - n**0.5))
    return k, n // k


def run(n: int, repeats: int) -> list[dict]:
    params = init_params(jr.PRNGKey(0))
    h = jnp.linspace(-1.0, 1.0, STATE)
    k, m = chunking(n)
    cases = [
        ("lax.scan", lax_scan_loss, n, 2 * n),
        ("lax.scan + checkpoint/step", checkpoint_per_step_loss, n, 2 * n),
        (
            f"nested sqrt(n) K={k} m={m}",
            lambda p, h, n: nested_loss(p, h, n, k),
            k + m,
            3 * n - k,
        ),
    ]
    for c in sorted({k, k + m, default_checkpoints(n)}):
        evals = loopax.schedule(n, c, max_steps=n, known_length=True).total_evaluations
        cases.append(
            (
                f"loopax.scan c={c}",
                lambda p, h, n, c=c: loopax_loss(p, h, n, c),
                c,
                evals,
            )
        )
    rows = []
    reference = None
    for name, loss, stored, evals in cases:
        grad = jax.grad(lambda p, h, loss=loss: loss(p, h, n), argnums=(0, 1))
        compile_s, run_s, temp = compile_and_time(grad, params, h, repeats=repeats)
        row = {
            "n": n,
            "method": name,
            "stored": stored,
            "evals": evals,
            "compile_s": compile_s,
            "grad_ms": run_s * 1e3,
            "temp_KiB": None if temp is None else temp / 1024,
        }
        if reference is None:
            reference = row
        row["time/lax"] = run_s * 1e3 / reference["grad_ms"]
        row["evals/lax"] = evals / reference["evals"]
        row["time_target"] = 1.1 * row["evals/lax"]
        rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    notes = []
    for n in sorted({r["n"] for r in rows}):
        group = [r for r in rows if r["n"] == n]
        nested = next(r for r in group if r["method"].startswith("nested"))
        for r in group:
            if not r["method"].startswith("loopax"):
                continue
            if r["stored"] == nested["stored"]:
                ok = r["evals"] < nested["evals"]
                notes.append(
                    f"n={n}: equal memory ({r['stored']} states): loopax "
                    f"{r['evals']} vs nested {nested['evals']} evaluations "
                    f"{'OK' if ok else 'TARGET MISSED'}"
                )
            ok = r["time/lax"] <= r["time_target"]
            notes.append(
                f"n={n}: {r['method']}: time/lax.scan {r['time/lax']:.2f} vs "
                f"target <= {r['time_target']:.2f} {'OK' if ok else 'TARGET MISSED'}"
            )
    return notes


def main() -> None:
    global STATE, HIDDEN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 1000 only")
    parser.add_argument("--state", type=int, default=STATE, help="state size")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help="MLP width")
    args = parser.parse_args()
    STATE, HIDDEN = args.state, args.hidden
    sizes = [1000] if args.quick else [1000, 10000]
    print(f"{machine()}; MLP state {STATE}, hidden {HIDDEN}")
    rows = []
    for n in sizes:
        rows.extend(run(n, repeats=3 if args.quick else 5))
    columns = ["n", "method", "stored", "evals", "compile_s", "grad_ms", "temp_KiB"]
    print_table(rows, [*columns, "time/lax", "evals/lax", "time_target"])
    notes = check_targets(rows)
    print()
    print("\n".join(notes))
    path = write_json(
        "scan", {"state": STATE, "hidden": HIDDEN, "rows": rows, "targets": notes}
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
