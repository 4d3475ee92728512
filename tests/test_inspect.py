"""Seeing the schedule before paying for it: `Schedule.recompute_factor`,
`.peak_memory`, `.render`, `.plot`; memory budgets (`checkpoints="auto"`,
`loopax.checkpoints_for_budget`); `loopax.suggest_checkpoints`; the `schedule` command.
"""

import functools as ft
import subprocess
import sys

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_allclose

import loopax
import loopax.__main__ as cli
from loopax._schedule.budget import (
    CONTROLLER_BYTES_PER_SLOT,
    MAX_AUTO_CHECKPOINTS,
    parse_memory_budget,
)
from loopax._schedule.picture import trace


# -- recompute factor, peak memory --------------------------------------------------


@pytest.mark.parametrize("known_length", [False, True])
@pytest.mark.parametrize("n, c", [(1, 1), (5, 1), (20, 3), (100, 4), (64, 10)])
def test_recompute_factor(n, c, known_length):
    plan = loopax.schedule(n, c, known_length=known_length)
    assert plan.recompute_factor == plan.total_evaluations / (2 * n)
    assert plan.recompute_factor >= 1.0
    assert (plan.recompute_factor == 1.0) == (plan.num_recomputed == 0)


def test_recompute_factor_edge_cases():
    assert loopax.schedule(0, 3).recompute_factor == 1.0
    assert loopax.schedule(5, 1).recompute_factor == 13 / 10
    assert loopax.schedule(10, 10, max_steps=10).recompute_factor == 1.0  # store-all


def test_recompute_factor_does_not_increase_with_checkpoints():
    """`suggest_checkpoints` bisects on this (checked up to n = 500 when written)."""
    for known_length in (False, True):
        for n in [*range(0, 31), 50]:
            factors = [
                loopax.schedule(n, c, known_length=known_length).recompute_factor
                for c in range(1, n + 2)
            ]
            assert all(
                a >= b for a, b in zip(factors[:-1], factors[1:], strict=True)
            ), (n, known_length)
            if n >= 2:  # n - 1 slots recompute nothing.
                assert factors[n - 2] == 1.0


def test_peak_memory():
    carry = (jnp.zeros((10, 4), jnp.float32), jnp.zeros((), jnp.int32), None)
    plan = loopax.schedule(50, 4)
    assert plan.peak_slots_used == 4
    assert plan.peak_memory(carry) == 4 * (160 + 4)
    # Shapes and dtypes are enough; Python scalars count as their JAX dtype.
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), carry)
    assert plan.peak_memory(structs) == 4 * 164
    assert plan.peak_memory((jnp.zeros(3, jnp.float16), 1.0)) == 4 * (6 + 4)
    # Buffers are excluded.
    big = (jnp.zeros(8, jnp.float32), jnp.zeros((1000, 8), jnp.float32))
    assert plan.peak_memory(big, buffers=lambda c: c[1]) == 4 * 32
    assert loopax.schedule(3, 8).peak_memory(big, buffers=lambda c: c[1]) == 3 * 32
    assert loopax.schedule(0, 8).peak_memory(big) == 0


def test_peak_memory_errors():
    plan = loopax.schedule(10, 2)
    with pytest.raises(TypeError, match=r"`buffers` must be None or a function"):
        plan.peak_memory(jnp.zeros(3), buffers=3)
    with pytest.raises(ValueError, match=r"`buffers` must return arrays of the carry"):
        plan.peak_memory(jnp.zeros(3), buffers=lambda c: jnp.zeros(2))


# -- text rendering -------------------------------------------------------------------


def test_render_summary_and_timeline():
    plan = loopax.schedule(6, 2)
    text = str(plan)
    assert text == plan.render()
    for expected in (
        "6 steps, 2 checkpoints",
        "online placement",
        "forward sweep        6",
        "recomputed           4",
        "VJPs                 6",
        "total               16",
        "recompute factor 1.333",
        "peak slots used      2  of 2",
        "timeline:",
    ):
        assert expected in text, (expected, text)
    # Every action appears once in the timeline, in order.
    tokens = " ".join(text.split("timeline:")[1].splitlines()[2:]).split()
    assert tokens[:3] == ["f0", "s1>0", "f1"]
    assert tokens.index("|") == 10
    assert "r0" in tokens and tokens[-2:] == ["x0<init", "v0"]
    assert len(tokens) == len(plan.actions) + 1
    assert "timeline:" not in plan.render(timeline=False)


def test_render_long_and_store_all():
    plan = loopax.schedule(1000, 10)
    text = str(plan)
    assert "timeline of 4552 body evaluations left out" in text
    assert plan.total_evaluations == 4552
    assert "recompute factor 2.276" in text
    assert "store-all" in str(loopax.schedule(5, 5, max_steps=5))
    assert "known up front" in str(loopax.schedule(9, 2, known_length=True))
    assert "timeline:" not in str(loopax.schedule(0, 2))


def test_trace_is_consistent():
    """The picture's layout: one unit of time per body evaluation, and never more
    checkpoints held at once than there are slots."""
    for n, c, kw in [(6, 2, {}), (40, 3, {}), (33, 3, dict(known_length=True))]:
        plan = loopax.schedule(n, c, **kw)
        layout = trace(plan)
        kinds = [s.kind for s in layout.segments]
        assert kinds.count("forward") == plan.num_forward
        assert kinds.count("recompute") == plan.num_recomputed
        assert kinds.count("vjp") == plan.num_vjp
        assert layout.forward_end == n
        assert len(layout.saves) == sum(a[0] == "save" for a in plan.actions)
        for t in range(len(layout.segments)):
            live = sum(t0 <= t < t1 for _, _, t0, t1 in layout.held)
            assert live <= plan.peak_slots_used <= c


# -- plot -----------------------------------------------------------------------------


def _check_png(path):
    import matplotlib.image

    assert path.stat().st_size > 10_000
    image = matplotlib.image.imread(path)[..., :3]
    assert image.std() > 0.02  # Not a blank image...
    assert 0.01 < (image.min(axis=-1) < 0.9).mean() < 0.5  # ... but mostly background.
    assert (np.ptp(image, axis=-1) > 0.3).any()  # And in colour.


@pytest.mark.parametrize(
    "n, c, kw", [(6, 2, {}), (300, 5, {}), (40, 4, dict(known_length=True))]
)
def test_plot_writes_png(tmp_path, n, c, kw):
    pytest.importorskip("matplotlib")
    path = tmp_path / "schedule.png"
    figure = loopax.schedule(n, c, **kw).plot(path)
    _check_png(path)
    ax = figure.axes[0]
    assert ax.get_xlabel().startswith("time")
    assert f"{n} steps" in ax.get_title()


def test_plot_into_axes():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert loopax.schedule(10, 2).plot(ax=ax) is figure
    assert len(ax.collections) >= 3


def test_plot_without_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.collections", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"needs matplotlib.*loopax\[plot\]"):
        loopax.schedule(10, 2).plot()


# -- memory budgets -------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, expected",
    [
        (1000, 1000),
        (np.int64(7), 7),
        ("2GiB", 2 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5 GB", 1_500_000_000),
        ("1.5gib", 3 * 2**29),
        (" 64 KiB ", 65536),
        ("100", 100),
        ("10B", 10),
        (".5KB", 500),
    ],
)
def test_parse_memory_budget(budget, expected):
    assert parse_memory_budget(budget) == expected


@pytest.mark.parametrize(
    "budget, error, match",
    [
        (
            "2 gigs",
            ValueError,
            r"`memory_budget` must be a number of bytes, got '2 gigs'",
        ),
        ("GiB", ValueError, r"must be a number of bytes"),
        ("-1GiB", ValueError, r"must be a number of bytes"),
        ("0MB", ValueError, r"`memory_budget` must be positive, got '0MB'"),
        (0, ValueError, r"`memory_budget` must be positive, got 0"),
        (
            1.5e9,
            TypeError,
            r"`memory_budget` must be an int or a string, got 1500000000.0",
        ),
        (True, TypeError, r"must be an int or a string"),
    ],
)
def test_parse_memory_budget_errors(budget, error, match):
    with pytest.raises(error, match=match):
        parse_memory_budget(budget)


CARRY = (jnp.zeros(8, jnp.float32), jnp.zeros((100, 8), jnp.float32))  # 32 + 3200 B


def test_checkpoints_for_budget():
    # Each checkpoint counts one carry plus the controllers' working memory.
    per_slot = CONTROLLER_BYTES_PER_SLOT
    assert loopax.checkpoints_for_budget(CARRY, (3232 + per_slot) * 5 + 3) == 5
    budget = (32 + per_slot) * 3 + 100
    assert loopax.checkpoints_for_budget(CARRY, budget, buffers=lambda c: c[1]) == 3
    assert loopax.checkpoints_for_budget(CARRY, "1MiB", buffers=lambda c: c[1]) == (
        2**20 // (32 + per_slot)
    )
    # Capped where the online rule's work per store would grow too large.
    assert (
        loopax.checkpoints_for_budget(CARRY, "1GiB", buffers=lambda c: c[1])
        == MAX_AUTO_CHECKPOINTS
    )
    # Capped at max_steps: then every step is stored.
    assert loopax.checkpoints_for_budget(CARRY, "1MiB", max_steps=40) == 40
    assert loopax.checkpoints_for_budget(CARRY, "1MiB", max_steps=0) == 1
    structs = jax.ShapeDtypeStruct((4, 4), jnp.float64)
    assert loopax.checkpoints_for_budget(structs, (128 + per_slot) * 8) == 8
    # All buffers: only a bound can cap the count.
    assert (
        loopax.checkpoints_for_budget(CARRY[1], 1, buffers=lambda c: c, max_steps=7)
        == 7
    )


def test_checkpoints_for_budget_errors():
    with pytest.raises(
        ValueError,
        match=r"`memory_budget` of 100 bytes \(100 B\) cannot hold even one "
        r"checkpoint: one copy of the carry \(buffers excluded\) takes 3232 bytes",
    ):
        loopax.checkpoints_for_budget(CARRY, 100)
    with pytest.raises(
        ValueError, match=r"`memory_budget` cannot choose `checkpoints`"
    ):
        loopax.checkpoints_for_budget(CARRY[1], 100, buffers=lambda c: c)
    with pytest.raises(ValueError, match=r"`max_steps` must be a non-negative"):
        loopax.checkpoints_for_budget(CARRY, 100, max_steps=-1)
    with pytest.raises(TypeError, match=r"`max_steps` must be a non-negative"):
        loopax.checkpoints_for_budget(CARRY, 100, max_steps=2.0)
    with pytest.raises(ValueError, match=r"`memory_budget` must be a number of bytes"):
        loopax.checkpoints_for_budget(CARRY, "lots")


# -- checkpoints="auto" in the loops --------------------------------------------------

W = jnp.eye(8, dtype=jnp.float32) * 0.9 + 0.01
_calls: list[int] = []


def _record(step):
    _calls.append(int(step))


def _body(c):
    i, x, big = c
    jax.debug.callback(_record, i, ordered=True)
    return i + 1, jnp.tanh(W @ x) + 0.1 * x + 0.01 * big[i % 100], big


def _loss(x, n, **options):
    init = (jnp.int32(0), x, jnp.ones((100, 8), jnp.float32))
    out = loopax.while_loop(lambda c: c[0] < n, _body, init, **options)
    return jnp.sum(out[1])


def _recorded_grad(n, **options):
    _calls.clear()
    grad = jax.block_until_ready(
        jax.jit(jax.grad(lambda x: _loss(x, n, **options)))(X0)
    )
    jax.effects_barrier()
    return grad, list(_calls)


X0 = jnp.linspace(-1.0, 1.0, 8, dtype=jnp.float32)
# The counter `i` and `x` (`big` is a buffer), and the controllers' working memory.
PER_CHECKPOINT = 4 + 32 + CONTROLLER_BYTES_PER_SLOT


def test_while_loop_auto_uses_the_budget():
    n, c = 17, 3
    budget = PER_CHECKPOINT * c + PER_CHECKPOINT - 1
    options = dict(checkpoints="auto", memory_budget=budget, buffers=lambda c: c[2])
    init = (jnp.int32(0), X0, jnp.ones((100, 8)))
    assert loopax.checkpoints_for_budget(init, budget, buffers=lambda c: c[2]) == c
    grad, calls = _recorded_grad(n, **options)
    assert tuple(calls) == loopax.schedule(n, c).body_calls
    assert tuple(calls) != loopax.schedule(n, c + 1).body_calls
    want, _ = _recorded_grad(n, checkpoints=c)
    assert_tree_allclose(grad, want)
    # With a bound that fits, every step is stored: the body runs once per step.
    _, calls = _recorded_grad(n, max_steps=20, **options | dict(memory_budget="1MiB"))
    assert calls == list(range(n))


def test_scan_and_fori_loop_auto():
    xs = jnp.linspace(0.0, 1.0, 12, dtype=jnp.float32)

    def f(carry, x):
        return jnp.sin(carry) * x + carry, carry[0]

    def loss(scan, init):
        carry, ys = scan(f, init, xs)
        return jnp.sum(carry) + jnp.sum(ys)

    init = jnp.ones(4, jnp.float32)
    want = jax.grad(ft.partial(loss, lax.scan))(init)
    three = (16 + CONTROLLER_BYTES_PER_SLOT) * 3
    for budget in (three, "1MiB"):  # 3 and (capped: all) 12 checkpoints.
        scan = ft.partial(loopax.scan, checkpoints="auto", memory_budget=budget)
        assert_tree_allclose(jax.grad(ft.partial(loss, scan))(init), want, rtol=1e-5)

    def fori(lower, upper, x):
        return loopax.fori_loop(
            lower,
            upper,
            lambda i, v: jnp.sin(v) + i.astype(v.dtype),
            x,
            checkpoints="auto",
            memory_budget=(16 + CONTROLLER_BYTES_PER_SLOT) * 2 + 100,
            max_steps=10,
        )

    want = jax.grad(
        lambda x: jnp.sum(lax.fori_loop(0, 7, lambda i, v: jnp.sin(v) + i, x))
    )(init)
    assert_tree_allclose(jax.grad(lambda x: jnp.sum(fori(0, 7, x)))(init), want)
    traced = jax.jit(jax.grad(lambda x, u: jnp.sum(fori(0, u, x))))
    assert_tree_allclose(traced(init, jnp.int32(7)), want)


def _while(**options):
    return loopax.while_loop(
        lambda c: c < 3.0, lambda c: c + 1.0, jnp.float32(0), **options
    )


def test_auto_is_ignored_by_other_kinds():
    for kind in ("lax", "bounded"):
        assert (
            _while(kind=kind, max_steps=5, checkpoints="auto", memory_budget=1) == 3.0
        )


@pytest.mark.parametrize(
    "options, error, match",
    [
        (
            dict(checkpoints="auto"),
            ValueError,
            r"checkpoints='auto' needs `memory_budget`",
        ),
        (
            dict(checkpoints=4, memory_budget="1GiB"),
            ValueError,
            r"`memory_budget` is used only with checkpoints='auto', got checkpoints=4",
        ),
        (dict(memory_budget=100), ValueError, r"`memory_budget` is used only with"),
        (
            dict(checkpoints="auto", memory_budget=3),
            ValueError,
            r"`memory_budget` of 3 bytes \(3 B\) cannot hold even one checkpoint",
        ),
        (
            dict(checkpoints="auto", memory_budget="3 parsecs"),
            ValueError,
            r"`memory_budget` must be a number of bytes",
        ),
        (
            dict(checkpoints="all"),
            TypeError,
            r"`checkpoints` must be a positive integer or None, got 'all'\. .*'auto'",
        ),
    ],
)
def test_while_loop_budget_errors(options, error, match):
    with pytest.raises(error, match=match):
        _while(**options)


def test_scan_and_fori_budget_errors():
    f = lambda c, x: (c + x, c)
    xs = jnp.ones(5, jnp.float32)
    with pytest.raises(ValueError, match=r"checkpoints='auto' needs `memory_budget`"):
        loopax.scan(f, jnp.float32(0), xs, checkpoints="auto")
    with pytest.raises(ValueError, match=r"`memory_budget` is used only with"):
        loopax.scan(f, jnp.float32(0), xs, checkpoints="all", memory_budget=10)
    with pytest.raises(ValueError, match=r"cannot hold even one checkpoint"):
        loopax.scan(
            f, jnp.zeros(4, jnp.float32), xs, checkpoints="auto", memory_budget=8
        )
    body = lambda i, v: v + 1.0
    with pytest.raises(ValueError, match=r"`memory_budget` is used only with"):
        loopax.fori_loop(0, 3, body, jnp.float32(0), memory_budget=10)
    with pytest.raises(ValueError, match=r"cannot hold even one checkpoint"):
        jax.jit(
            lambda u: loopax.fori_loop(
                0, u, body, jnp.zeros(4), checkpoints="auto", memory_budget=8
            )
        )(3)


# -- suggest_checkpoints --------------------------------------------------------------


@pytest.mark.parametrize("known_length", [False, True])
@pytest.mark.parametrize(
    "n, target", [(100, 2.0), (100, 1.5), (1000, 3.0), (50, 1.0), (1, 1.0)]
)
def test_suggest_checkpoints_recompute(n, target, known_length):
    c = loopax.suggest_checkpoints(
        n, max_recompute_factor=target, known_length=known_length
    )
    factor = lambda c: loopax.schedule(n, c, known_length=known_length).recompute_factor
    assert factor(c) <= target
    if c > 1:
        assert factor(c - 1) > target


def test_suggest_checkpoints_budget():
    carry = jnp.zeros(256, jnp.float32)  # 1 KiB
    # Each checkpoint: 1 KiB of carry and 1 KiB of the controllers' working memory.
    assert loopax.suggest_checkpoints(1000, memory_budget="10KiB", carry=carry) == 5
    assert loopax.suggest_checkpoints(5, memory_budget="10KiB", carry=carry) == 4
    big = (carry, jnp.zeros(10**5))
    assert (
        loopax.suggest_checkpoints(
            1000, memory_budget="10KiB", carry=big, buffers=lambda c: c[1]
        )
        == 5
    )
    # Both: the smallest count meeting the target, if it fits.
    c = loopax.suggest_checkpoints(
        1000, max_recompute_factor=2.5, memory_budget="1MiB", carry=carry
    )
    assert c == loopax.suggest_checkpoints(1000, max_recompute_factor=2.5)


def test_suggest_checkpoints_errors():
    carry = jnp.zeros(256, jnp.float32)
    with pytest.raises(
        ValueError, match=r"needs a target: pass `max_recompute_factor=`"
    ):
        loopax.suggest_checkpoints(100)
    with pytest.raises(ValueError, match=r"`memory_budget` needs `carry=`"):
        loopax.suggest_checkpoints(100, memory_budget="1GiB")
    with pytest.raises(ValueError, match=r"`carry` and `buffers` are only used with"):
        loopax.suggest_checkpoints(100, max_recompute_factor=2.0, carry=carry)
    with pytest.raises(
        ValueError, match=r"`max_recompute_factor` must be >= 1, got 0.5"
    ):
        loopax.suggest_checkpoints(100, max_recompute_factor=0.5)
    with pytest.raises(TypeError, match=r"`max_recompute_factor` must be a number"):
        loopax.suggest_checkpoints(100, max_recompute_factor="2")
    with pytest.raises(ValueError, match=r"`num_steps` must be a non-negative"):
        loopax.suggest_checkpoints(-1, max_recompute_factor=2.0)
    with pytest.raises(
        ValueError,
        match=r"`max_recompute_factor=1.5` and `memory_budget='2KiB'` contradict each "
        r"other: 200 steps need at least \d+ checkpoints",
    ):
        loopax.suggest_checkpoints(
            200, max_recompute_factor=1.5, memory_budget="2KiB", carry=carry
        )
    with pytest.raises(ValueError, match=r"cannot hold even one checkpoint"):
        loopax.suggest_checkpoints(1000, memory_budget=100, carry=carry)


# -- command line ---------------------------------------------------------------------


def test_cli_schedule(capsys, tmp_path):
    assert cli.main(["schedule", "--steps", "1000", "--checkpoints", "10"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "1000 steps, 10 checkpoints",
        "forward sweep     1000",
        "recomputed        2552",
        "VJPs              1000",
        "total             4552",
        "recompute factor 2.276",
        "peak slots used     10",
    ):
        assert expected in out, (expected, out)
    args = ["schedule", "--steps", "30", "--checkpoints", "3", "--max-steps", "20"]
    assert cli.main([*args, "--known-length"]) == 0
    out = capsys.readouterr().out
    assert "20 steps, 3 checkpoints, max_steps=20" in out and "timeline:" in out
    assert cli.main(["schedule", "--steps", "10", "--checkpoints", "0"]) == 2
    assert "`checkpoints` must be a positive integer" in capsys.readouterr().err


def test_cli_schedule_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "out.png"
    argv = ["schedule", "--steps", "100", "--checkpoints", "4", "--plot", str(path)]
    assert cli.main(argv) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    _check_png(path)


def test_demo_legend_explains_every_column():
    legend = cli._legend().splitlines()
    for column in cli._HEADER:
        assert any(line.startswith(f"  {column}  ") for line in legend), column
    assert cli._bytes(9_472) == "9.5 KB" and cli._bytes(1_400_000) == "1.4 MB"


def test_cli_default_runs_demo(monkeypatch):
    monkeypatch.setattr(cli, "demo", lambda: 7)
    assert cli.main([]) == 7
    assert cli.main(["demo"]) == 7


def test_python_dash_m():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopax",
            "schedule",
            "--steps",
            "12",
            "--checkpoints",
            "2",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "12 steps, 2 checkpoints" in out
