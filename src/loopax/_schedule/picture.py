"""Text and matplotlib renderings of a `loopax.Schedule`."""

from typing import TYPE_CHECKING, Any, NamedTuple


if TYPE_CHECKING:
    from .replay import Schedule


# Above this many actions the text rendering leaves the timeline out.
MAX_TIMELINE_ACTIONS = 240


class _Segment(NamedTuple):
    kind: str  # "forward", "recompute" or "vjp"
    time: int  # the body evaluation's index: it runs from `time` to `time + 1`
    start: int  # the step of the state before it
    end: int  # ... and after it


class _Trace(NamedTuple):
    segments: list[_Segment]
    saves: list[tuple[int, int, int]]  # (time, step, slot)
    restores: list[tuple[int, int, int, int]]  # (time, from_step, to_step, slot)
    held: list[tuple[int, int, int, int]]  # (step, slot, from_time, to_time)
    forward_end: int  # the time the forward sweep ends


def trace(plan: "Schedule") -> _Trace:
    """Lay the actions out in time: each body evaluation takes one unit, saves and
    restores take none. Also works out how long each checkpoint is held: from its save
    until its slot is overwritten or the VJP of its step has run (its slot is free
    then)."""
    segments, saves, restores, held = [], [], [], []
    time, cur, forwards = 0, 0, 0
    forward_end = None
    live: dict[int, tuple[int, int]] = {}  # slot -> (step, save time)

    def release(slot, when):
        step, since = live.pop(slot)
        held.append((step, slot, since, when))

    for kind, step, slot in plan.actions:
        if kind == "forward":
            forwards += 1
            phase = "forward" if forwards <= plan.num_forward else "recompute"
            segments.append(_Segment(phase, time, step, step + 1))
            time, cur = time + 1, step + 1
        elif kind == "vjp":
            if forward_end is None:
                forward_end = time
            segments.append(_Segment("vjp", time, step + 1, step))
            time, cur = time + 1, step
            for s in [s for s, (k, _) in live.items() if k >= step]:
                release(s, time)
        elif kind == "save":
            if slot in live:
                release(slot, time)
            live[slot] = (step, time)
            saves.append((time, step, slot))
        elif kind == "restore":
            if forward_end is None:
                forward_end = time
            restores.append((time, cur, step, slot))
            cur = step
        else:
            raise AssertionError(
                f"loopax internal error: unknown schedule action {kind!r}; please "
                "report a bug."
            )
    for s in list(live):
        release(s, time)
    return _Trace(
        segments, saves, restores, held, time if forward_end is None else forward_end
    )


def _token(kind: str, step: int, slot: int, recompute: bool) -> str:
    if kind == "forward":
        return f"{'r' if recompute else 'f'}{step}"
    if kind == "vjp":
        return f"v{step}"
    if kind == "save":
        return f"s{step}>{slot}"
    return f"x{step}<{'init' if slot < 0 else slot}"


def render(plan: "Schedule", timeline: bool | None = None, width: int = 88) -> str:
    """A readable summary of `plan`, and its timeline when it is short."""
    n = plan.num_steps
    placement = (
        "store-all (VJP residuals of every step)"
        if plan.stores_residuals
        else "revolve placement, trip count known up front"
        if plan.known_length
        else "online placement, trip count unknown while the loop runs"
    )
    bound = "" if plan.max_steps is None else f", max_steps={plan.max_steps}"
    rows = [
        ("forward sweep", str(plan.num_forward), "body evaluations"),
        ("recomputed", str(plan.num_recomputed), "body evaluations"),
        ("VJPs", str(plan.num_vjp), "one-step VJPs"),
        ("total", str(plan.total_evaluations), "evaluations"),
        (
            "recompute factor",
            f"{plan.recompute_factor:.3f}",
            "total / 2n (1: nothing recomputed)",
        ),
        ("peak slots used", str(plan.peak_slots_used), f"of {plan.checkpoints}"),
    ]
    value_width = max(len(r[1]) for r in rows)
    lines = [
        f"loopax.Schedule: {n} steps, {plan.checkpoints} checkpoints{bound}",
        f"  {placement}",
    ]
    lines += [
        f"  {label:<17}{value:>{value_width}}  {unit}" for label, value, unit in rows
    ]
    if timeline is None:
        # Every body evaluation is an action: a long schedule is not enumerated.
        timeline = (
            0 < plan.total_evaluations <= MAX_TIMELINE_ACTIONS
            and len(plan.actions) <= MAX_TIMELINE_ACTIONS
        )
    if not timeline:
        lines.append(
            f"  (timeline of {plan.total_evaluations} body evaluations left out: see "
            "`.iter_actions()` or `.plot()`)"
        )
        return "\n".join(lines)
    lines.append(
        "timeline: fK forward from x_K, rK recompute from x_K, vK VJP of step K,"
    )
    lines.append(
        "  sK>J save x_K to slot J, xK<J restore x_K from slot J, | backward sweep"
    )
    tokens, forwards, started = [], 0, False
    for kind, step, slot in plan.iter_actions():
        if kind == "forward":
            forwards += 1
        if not started and kind in ("restore", "vjp"):
            tokens.append("|")
            started = True
        tokens.append(_token(kind, step, slot, forwards > plan.num_forward))
    line = " "
    for token in tokens:
        if len(line) + 1 + len(token) > width:
            lines.append(line)
            line = " "
        line += " " + token
    if line.strip():
        lines.append(line)
    return "\n".join(lines)


_COLOURS = {
    "forward": "#1f77b4",
    "recompute": "#ff7f0e",
    "vjp": "#d62728",
    "save": "#2ca02c",
    "restore": "#9467bd",
    "held": "#b0b0b0",
}


def plot(plan: "Schedule", path: Any = None, *, ax: Any = None) -> Any:
    """Draw `plan` with matplotlib; see `Schedule.plot`."""
    try:
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise ImportError(
            "`Schedule.plot` needs matplotlib, which is not installed. Install "
            "loopax's `plot` extra: `pip install 'loopax[plot]'` (or `pip install "
            "matplotlib`)."
        ) from e
    layout = trace(plan)
    if ax is None:
        fig = Figure(figsize=(10, 5.5), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    dense = len(layout.segments) > 2000
    markers = len(layout.segments) <= 400
    line_width = 0.8 if dense else 1.8
    held = [[(t0, k), (t1, k)] for k, _, t0, t1 in layout.held if t1 > t0]
    ax.add_collection(
        LineCollection(
            held, colors=_COLOURS["held"], linewidths=3 if not dense else 1, zorder=1
        )
    )
    for kind in ("forward", "recompute", "vjp"):
        lines = [
            [(s.time, s.start), (s.time + 1, s.end)]
            for s in layout.segments
            if s.kind == kind
        ]
        if lines:
            ax.add_collection(
                LineCollection(
                    lines, colors=_COLOURS[kind], linewidths=line_width, zorder=3
                )
            )
    jumps = [[(t, a), (t, b)] for t, a, b, _ in layout.restores if a != b]
    if jumps:
        ax.add_collection(
            LineCollection(
                jumps,
                colors=_COLOURS["restore"],
                linewidths=0.8,
                linestyles="dotted",
                zorder=2,
            )
        )
    if markers:
        if layout.saves:
            t, k, _ = zip(*layout.saves, strict=True)
            ax.scatter(t, k, s=18, color=_COLOURS["save"], zorder=4, marker="o")
        if layout.restores:
            t, _, k, _ = zip(*layout.restores, strict=True)
            ax.scatter(t, k, s=22, color=_COLOURS["restore"], zorder=4, marker=">")
    if layout.forward_end > 0:
        ax.axvline(layout.forward_end, color="0.6", linewidth=0.6, linestyle="--")
    total_time = max(1, len(layout.segments))
    ax.set_xlim(-0.01 * total_time, total_time * 1.01)
    ax.set_ylim(-0.5, plan.num_steps + 0.5)
    ax.set_xlabel("time (body evaluations, in order)")
    ax.set_ylabel("step k (state $x_k$)")
    placement = (
        "store-all"
        if plan.stores_residuals
        else "known length"
        if plan.known_length
        else "online"
    )
    ax.set_title(
        f"{plan.num_steps} steps, {plan.checkpoints} checkpoints ({placement}): "
        f"{plan.num_forward} forward + {plan.num_recomputed} recomputed + "
        f"{plan.num_vjp} VJPs = {plan.total_evaluations} evaluations, "
        f"recompute factor {plan.recompute_factor:.3g}, peak slots "
        f"{plan.peak_slots_used}",
        fontsize=9,
    )
    handles = [
        Line2D([], [], color=_COLOURS["forward"], label="forward sweep"),
        Line2D([], [], color=_COLOURS["recompute"], label="recomputation"),
        Line2D([], [], color=_COLOURS["vjp"], label="VJP of a step"),
        Line2D([], [], color=_COLOURS["held"], linewidth=3, label="checkpoint held"),
        Line2D([], [], color=_COLOURS["restore"], linestyle="dotted", label="restore"),
    ]
    if markers:
        handles.insert(
            4,
            Line2D(
                [],
                [],
                color=_COLOURS["save"],
                marker="o",
                linestyle="",
                label="save to a slot",
            ),
        )
    ax.legend(handles=handles, loc="upper right", fontsize=8)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
