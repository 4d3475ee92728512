"""Run every benchmark, summarise the targets of issue 6, and draw the plots.

Each script runs as its own subprocess (a fresh JAX, so one script's compilation
caches and memory do not affect the next), one after another (they time themselves;
running them side by side would make the timings meaningless). Then their JSON in
`benchmarks/results/` is read, a table of the targets is printed with PASS / MISSED,
written to `benchmarks/results/summary.json`, and PNG plots are written to
`docs/images/` (needs matplotlib: `pip install loopax[bench]`).

Modes: `--quick` (under 5 minutes on 2 CPU cores: fewer sizes and repeats, the large
state at N = 50) and full (the default: every size; tens of minutes on a CPU).
`--summary-only` skips running and summarises the JSON already there.

Run: `python benchmarks/run_all.py [--quick] [--only NAME ...] [--summary-only]`.
"""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS_DIR


HERE = Path(__file__).parent
IMAGES = HERE.parent / "docs" / "images"

# script: (arguments in quick mode, arguments in full mode)
SCRIPTS = {
    "recompute": ([], ["--measure"]),
    "neural_ode": (["--quick"], []),
    "vmap_stopping": (["--quick"], []),
    # Diagnostic: is the vmap cost the batched predicate or vmap itself? (Not in
    # the default quick list, to stay under 5 minutes; `--only` runs it.)
    "vmap_stopping_same_stop": (["--quick", "--same-stop"], ["--same-stop"]),
    # The neural ODE part of against_equinox.py is covered by neural_ode.py; quick mode
    # runs its large-state workload only (workload 4), at N = 50.
    "against_equinox": (["--quick", "--large-only", "--large-steps", "50"], []),
    "buffers": (["--quick"], []),
    "scan": (["--quick"], []),
    "bounded": (["--quick"], []),
    "transformations": (["--quick"], []),
    # Needs the `clients` extra (Diffrax); skipped when Diffrax is not installed.
    "clients": (["--quick"], []),
}
OPTIONAL = {"clients": "diffrax"}

QUICK_SKIP = {"vmap_stopping_same_stop"}


def run_scripts(names: list[str], quick: bool) -> dict[str, dict]:
    report = {}
    for name in names:
        args = SCRIPTS[name][0 if quick else 1]
        module = OPTIONAL.get(name)
        if module is not None and importlib.util.find_spec(module) is None:
            print(f"\n{'=' * 20} {name}: skipped ({module} not installed)")
            continue
        script = HERE / f"{name.removesuffix('_same_stop')}.py"
        command = [sys.executable, str(script), *args]
        print(f"\n{'=' * 20} {name} {' '.join(args)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=HERE, check=False)
        elapsed = time.perf_counter() - start
        report[name] = {"args": args, "seconds": elapsed, "returncode": done.returncode}
        print(f"{'=' * 20} {name}: {elapsed:.0f} s, exit {done.returncode}", flush=True)
    return report


# The scripts run in this invocation; `None` (with `--summary-only`): every result
# file is summarised. Otherwise files left by earlier runs are ignored, so a summary
# never mixes in stale numbers (quick mode skips some scripts).
_FRESH: set[str] | None = None


def load(name: str):
    if _FRESH is not None and name not in _FRESH:
        return None
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    # Scripts using `_common.write_json` nest their payload under "results".
    return data.get("results", data) if "machine" in data else data


def status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISSED")


def targets() -> list[dict]:
    """The targets of issue 6 ("Targets to report against"), then other issues'."""
    rows = []

    def add(target, workload, value, limit, ok=None, note="", check=None, cpu=None):
        if ok is None and value is not None:
            ok = value <= limit
        if check is not None:
            cpu = check.get("cpu_value")
        rows.append(
            {
                "target": target,
                "workload": workload,
                "value": value,
                "cpu": cpu,
                "limit": limit,
                "status": status(ok),
                "status_cpu": "" if cpu is None else status(cpu <= limit),
                "note": note,
            }
        )

    ode = load("neural_ode")
    large = load("against_equinox")
    if ode is not None:
        checks = ode["checks"]
        for c in checks:
            if c["target"].startswith("grad loopax / equinox") and c["limit"]:
                add(
                    "grad time / Equinox <= 0.8",
                    f"1: ODE N={c['N']} c=8",
                    c["value"],
                    0.8,
                    check=c,
                )
    if large is not None:
        for r in large["large_state"]:
            add(
                "grad time / Equinox <= 0.8",
                f"4: large state N={r['num_steps']} c={r['checkpoints']}",
                r["time_ratio"],
                0.8,
                cpu=r.get("cpu_time_ratio"),
            )
    if ode is not None:
        for c in checks:
            if c["target"].startswith("grad loopax store-all / lax.scan"):
                add(
                    "grad store-all / lax.scan <= 1.15",
                    f"1: ODE N={c['N']}",
                    c["value"],
                    1.15,
                    check=c,
                )
        for c in checks:
            if c["target"].startswith("forward"):
                variant = (
                    "max_steps=N" if "max_steps=N" in c["target"] else "no max_steps"
                )
                add(
                    "forward / lax.while_loop <= 1.02",
                    f"1: ODE N={c['N']} ({variant})",
                    c["value"],
                    1.02,
                    check=c,
                )
        for c in checks:
            if c["target"].startswith("grad temp bytes"):
                label = c["target"].split(", ", 1)[1].removesuffix(" <= 1")
                note = ""
                if label.startswith("store-all"):
                    note = "by design: stores VJP residuals like lax.scan; Equinox stores carries"
                add(
                    "temp bytes <= Equinox's",
                    f"1: ODE N={c['N']} {label}",
                    c["value"],
                    1.0,
                    note=note,
                )
    if large is not None:
        for r in large["large_state"]:
            add(
                "temp bytes <= Equinox's",
                f"4: large state c={r['checkpoints']}",
                r["temp_ratio"],
                1.0,
            )
    return rows


def other_checks() -> list[dict]:
    """Targets of earlier issues, from the other scripts' JSON."""
    rows = []
    recompute = load("recompute")
    if recompute is not None:
        s = recompute["summary"]
        rows += [
            {
                "check": "recompute: max ours / optimal <= 1.15",
                "value": s["max_ours_over_optimal"],
                "status": status(s["max_ours_over_optimal"] <= 1.15),
            },
            {
                "check": "recompute: geomean ours / optimal <= 1.05",
                "value": s["geomean_ours_over_optimal"],
                "status": status(s["geomean_ours_over_optimal"] <= 1.05),
            },
            {
                "check": "recompute: ours <= Equinox at every point",
                "value": f"{s['points_le_equinox']}/{s['points']}",
                "status": status(s["points_le_equinox"] == s["points"]),
            },
        ]
    buffers = load("buffers")
    if buffers is not None:
        rows.append(
            {
                "check": "buffers: loopax-lax linear in N, every variant (buffers.py)",
                "value": "; ".join(buffers["failures"]) or "all linear",
                "status": status(not buffers["failures"]),
            }
        )
        for kind in ("loopax-lax", "loopax-checkpointed"):
            worst = max(
                min(v, buffers["cpu_ratios"][k])
                for k, v in buffers["ratios"].items()
                if f"|{kind}|10000/1000" in k
            )
            rows.append(
                {
                    "check": f"buffers: {kind} worst time(10N)/time(N) <= 12 (min of wall, CPU)",
                    "value": worst,
                    "status": status(worst <= 12),
                }
            )
    scan = load("scan")
    if scan is not None:
        notes = scan["targets"]
        missed = [n for n in notes if "MISSED" in n]
        rows.append(
            {
                "check": "scan: evaluations / time targets (issue 5)",
                "value": f"{len(notes) - len(missed)}/{len(notes)} met",
                "status": status(not missed),
            }
        )
    transformations = load("transformations")
    if transformations is not None:
        ratio = transformations["ratios"]["jvp checkpointed / jvp lax"]
        rows.append(
            {
                "check": "transformations: jvp checkpointed / jvp lax <= 1.3 (issue 8)",
                "value": ratio,
                "status": status(ratio <= 1.3),
            }
        )
    bounded = load("bounded")
    if bounded is not None:
        s = bounded["summary"]
        jump = s["loopax_grad_run_cpu_s_4097_over_4096"]
        early = s["loopax_grad_run_cpu_s_early_exit_4096_over_16"]
        rows.append(
            {
                "check": "bounded: grad CPU time 4097 / 4096 (no jump)",
                "value": jump,
                "status": status(jump <= 1.1),
            }
        )
        rows.append(
            {
                "check": "bounded: early exit grad 4096 / 16 <= 3",
                "value": early,
                "status": status(early <= 3),
            }
        )
    clients = load("clients")
    if clients is not None:
        for r in clients["rows"]:
            rows.append(
                {
                    "check": f"Diffrax client: grad loopax / equinox, c={r['checkpoints']}"
                    f" <= {clients['target']}",
                    "value": r["ratio"],
                    "status": status(r["ratio"] <= clients["target"]),
                }
            )
    for name, label in (
        ("vmap_stopping", "vmap, stops N/2..N"),
        ("vmap_stopping_same_stop", "vmap, all stop at N"),
    ):
        vmap = load(name)
        if vmap is None:
            continue
        for key, value in vmap["ratios"].items():
            rows.append(
                {
                    "check": f"{label} (no target): {key}",
                    "value": value,
                    "status": "n/a",
                }
            )
    return rows


def fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3f}"
    return "" if x is None else str(x)


def print_rows(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(fmt(r.get(c)).ljust(widths[c]) for c in columns))


def plots() -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install loopax[bench]): no plots")
        return []
    IMAGES.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = IMAGES / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    recompute = load("recompute")
    if recompute is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        by_c = {}
        for r in recompute["rows"]:
            by_c.setdefault(r["c"], []).append(r)
        for c, rs in sorted(by_c.items()):
            rs.sort(key=lambda r: r["n"])
            n = [r["n"] for r in rs]
            axes[0].plot(n, [r["ours/opt"] for r in rs], marker="o", label=f"c={c}")
            axes[1].plot(n, [r["ours/eqx"] for r in rs], marker="o", label=f"c={c}")
        axes[0].axhline(1.15, color="red", ls="--", lw=1, label="target 1.15")
        axes[1].axhline(1.0, color="red", ls="--", lw=1, label="Equinox")
        axes[0].set(
            xscale="log",
            xlabel="steps n",
            ylabel="evaluations / offline optimum",
            title="loopax vs optimum",
        )
        axes[1].set(
            xscale="log",
            yscale="log",
            xlabel="steps n",
            ylabel="evaluations / Equinox's",
            title="loopax vs Equinox",
        )
        axes[0].legend(fontsize=7, ncol=2)
        axes[1].legend(fontsize=7, ncol=2)
        save(fig, "recompute_ratio.png")

    ode = load("neural_ode")
    large = load("against_equinox")
    if ode is not None or large is not None:
        fig, ax = plt.subplots(figsize=(10, 4))
        labels, values, colors, cpu = [], [], [], []
        if ode is not None:
            for c in ode["checks"]:
                if c["target"].startswith("grad loopax / equinox"):
                    label = (
                        c["target"].split(", ", 1)[1].split(" <=")[0].split(" (no")[0]
                    )
                    short = label.replace("store-all", "all").replace("default ", "")
                    labels.append(f"ODE {c['N']}\n{short}")
                    values.append(c["value"])
                    colors.append("tab:blue")
                    cpu.append(c.get("cpu_value"))
                elif c["target"].startswith("grad loopax store-all"):
                    labels.append(f"ODE {c['N']}\nall / scan")
                    values.append(c["value"])
                    colors.append("tab:green")
                    cpu.append(c.get("cpu_value"))
        if large is not None:
            for r in large["large_state"]:
                labels.append(f"large\nc={r['checkpoints']}")
                values.append(r["time_ratio"])
                colors.append("tab:orange")
                cpu.append(r.get("cpu_time_ratio"))
        ax.bar(range(len(values)), values, color=colors, label="wall-clock ratio")
        shown = [(i, v) for i, v in enumerate(cpu) if v is not None]
        if shown:
            ax.scatter(
                *zip(*shown, strict=True),
                marker="D",
                color="black",
                zorder=3,
                label="process CPU-time ratio",
            )
        ax.set_xticks(range(len(values)), labels, fontsize=7)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(
            0.8,
            color="red",
            ls="--",
            lw=1,
            label="target vs Equinox 0.8 (ODE c=8, large state)",
        )
        ax.axhline(
            1.15,
            color="green",
            ls="--",
            lw=1,
            label="target store-all vs lax.scan 1.15",
        )
        ax.set_ylabel("grad time ratio (loopax / competitor)")
        ax.set_title(
            "Gradient time: loopax / Equinox (blue, orange), loopax store-all / lax.scan (green)"
        )
        ax.legend(fontsize=7)
        save(fig, "grad_time_ratios.png")

    if ode is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        series = {}
        for r in ode["rows"]:
            if r["group"] == "grad":
                name = r["variant"].split(" (c=")[0].split(" c=")[0]
                if r["variant"].split()[1:2] == ["c=8"] or r["variant"].split()[
                    1:2
                ] == ["c=32"]:
                    name = " ".join(r["variant"].split()[:2])
                series.setdefault(name, []).append((r["N"], r["run_s"]))
        for name, points in sorted(series.items()):
            points.sort()
            style = (
                "-"
                if name.startswith("loopax")
                else ("--" if name.startswith("equinox") else ":")
            )
            ax.plot(*zip(*points, strict=True), marker="o", ls=style, label=name)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="steps N",
            ylabel="grad time (s)",
            title="RK4 neural ODE: gradient time",
        )
        ax.legend(fontsize=7)
        save(fig, "neural_ode_grad_time.png")

    if ode is not None or large is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if large is not None:
            rs = sorted(large["large_state"], key=lambda r: r["checkpoints"])
            c = [r["checkpoints"] for r in rs]
            axes[0].plot(
                c, [r["loopax_temp_carries"] for r in rs], marker="o", label="loopax"
            )
            axes[0].plot(
                c, [r["equinox_temp_carries"] for r in rs], marker="s", label="Equinox"
            )
            axes[0].plot(
                c,
                [r["bound_c_plus_3"] for r in rs],
                ls="--",
                color="gray",
                label="c + 3",
            )
            axes[0].set(
                xlabel="checkpoints c",
                ylabel="XLA temp memory (carries)",
                title="large state (2^20 float32)",
            )
            axes[0].legend(fontsize=8)
        if ode is not None:
            n = (
                1000
                if any(r["N"] == 1000 for r in ode["rows"])
                else max(r["N"] for r in ode["rows"])
            )
            for impl, marker in (("loopax", "o"), ("equinox", "s")):
                pts = sorted(
                    (r["checkpoints"], r["temp_bytes"] / 1024)
                    for r in ode["rows"]
                    if r["N"] == n
                    and r["group"] == "grad"
                    and r["variant"].startswith(impl)
                    and "store-all" not in r["variant"]
                )
                if pts:
                    axes[1].plot(*zip(*pts, strict=True), marker=marker, label=impl)
            axes[1].set(
                xlabel="checkpoints c",
                ylabel="XLA temp memory (KiB)",
                title=f"RK4 neural ODE, N={n} (store-all omitted)",
            )
            axes[1].legend(fontsize=8)
        save(fig, "memory_vs_checkpoints.png")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="under 5 minutes on 2 cores"
    )
    parser.add_argument("--only", nargs="+", choices=list(SCRIPTS), default=None)
    parser.add_argument(
        "--summary-only",
        action="store_true",
        help="do not run; summarise existing JSON",
    )
    args = parser.parse_args()
    begin = time.perf_counter()
    report = {}
    if not args.summary_only:
        global _FRESH
        default = [n for n in SCRIPTS if not (args.quick and n in QUICK_SKIP)]
        report = run_scripts(args.only or default, args.quick)
        _FRESH = {name for name, r in report.items() if r["returncode"] == 0}
    total = time.perf_counter() - begin

    print(
        f"\n{'=' * 20} targets of issue 6 (ratios measured side by side in one process)"
    )
    target_rows = targets()
    if target_rows:
        print_rows(
            target_rows,
            [
                "target",
                "workload",
                "value",
                "cpu",
                "limit",
                "status",
                "status_cpu",
                "note",
            ],
        )
    missed = [r for r in target_rows if r["status"] == "MISSED"]
    print(
        f"\n{len(target_rows) - len(missed)} of {len(target_rows)} PASS, {len(missed)} MISSED"
    )
    print(f"\n{'=' * 20} other checks (earlier issues)")
    check_rows = other_checks()
    if check_rows:
        print_rows(check_rows, ["check", "value", "status"])
    images = plots()
    for path in images:
        print(f"wrote {path}")
    if report:
        print(
            "\nrun times: "
            + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in report.items())
        )
        print(f"total {total:.0f} s ({'quick' if args.quick else 'full'} mode)")
    failed = [k for k, v in report.items() if v["returncode"] != 0]
    if failed:
        print("FAILED scripts: " + ", ".join(failed))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "summary.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "quick": args.quick,
                "total_s": total if report else None,
                "scripts": report,
                "targets": target_rows,
                "other_checks": check_rows,
                "images": [str(p.relative_to(HERE.parent)) for p in images],
            },
            indent=2,
            default=lambda x: (
                None if isinstance(x, float) and math.isnan(x) else str(x)
            ),
        )
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
