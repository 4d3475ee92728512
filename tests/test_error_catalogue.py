"""The error catalogue (`docs/errors.md`) is complete and true.

- Every entry is triggered here and its message (with `…` standing for any text) must
  match what loopax raises, with one of the entry's exception types.
- Every error message in `src/loopax` must match an entry: the message of each `raise`
  whose text can be read from the source (string literals, f-strings, concatenations,
  and local variables assigned from them), and each module-level message constant
  (string constants of 40 characters or more, except `*HINT*` fragments, which are
  appended to messages checked at their raise sites). Messages built only from
  run-time values (`raise ValueError(message)` with `message` a parameter) are covered
  by the constants they are given.
"""

import ast
import builtins
import importlib
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from helpers import toy_body, toy_cond, toy_init, toy_loop

import loopax
from loopax._schedule.picture import plot, trace


_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DOC = _ROOT / "docs" / "errors.md"
_SRC = _ROOT / "src" / "loopax"
_HOLE = "…"


def _parse_catalogue() -> dict[str, tuple[list[str], tuple[type, ...]]]:
    """`{anchor: (messages, exception types)}` from `docs/errors.md`."""
    entries: dict[str, tuple[list[str], tuple[type, ...]]] = {}
    anchor = None
    for line in _DOC.read_text().splitlines():
        heading = re.match(r"^### .* \{ #([a-z0-9-]+) \}$", line)
        if heading:
            anchor = heading.group(1)
            assert anchor not in entries, f"duplicate catalogue anchor {anchor}"
            entries[anchor] = ([], ())
            continue
        if anchor is None:
            continue
        message = re.match(r"^- \*\*Message:\*\* `` (.*) ``$", line)
        if message:
            entries[anchor][0].append(message.group(1))
        kind = re.match(r"^- \*\*Type:\*\* (.*)$", line)
        if kind:
            names = re.findall(r"`(\w+)`", kind.group(1))
            types_ = tuple(getattr(builtins, n) for n in names)
            entries[anchor] = (entries[anchor][0], types_)
    for anchor, (messages, types_) in entries.items():
        assert messages and types_, f"catalogue entry {anchor} lacks a message or type"
    return entries


def _pattern(message: str) -> str:
    """A catalogue message as a regex: `…` matches any text."""
    return ".*?".join(re.escape(part) for part in message.split(_HOLE))


# -- triggers: one per catalogue entry ------------------------------------------------


def _buffer_loop(body, kind="lax"):
    def run():
        return loopax.while_loop(
            lambda c: c[0] < 3,
            body,
            (jnp.array(0), jnp.zeros(3)),
            kind=kind,
            max_steps=3,
            buffers=lambda c: c[1],
            check_buffers=True,
        )

    jax.block_until_ready(jax.jit(run)())


def _export(f):
    """Export `f` for a float vector of symbolic length."""
    (b,) = jax.export.symbolic_shape("b")
    jax.export.export(jax.jit(f))(jax.ShapeDtypeStruct((b,), jnp.float32))


def _no_matplotlib():
    saved = {k: v for k, v in sys.modules.items() if k.startswith("matplotlib")}
    try:
        for name in ("matplotlib", "matplotlib.collections", "matplotlib.figure"):
            sys.modules[name] = None  # type: ignore[assignment]
        plot(loopax.schedule(num_steps=3, checkpoints=1))
    finally:
        for name in ("matplotlib", "matplotlib.collections", "matplotlib.figure"):
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _client_missing():
    """`import loopax.diffrax` as if Diffrax were not installed."""
    names = ("diffrax", "loopax.diffrax")
    saved = {name: sys.modules[name] for name in names if name in sys.modules}
    try:
        sys.modules["diffrax"] = None  # type: ignore[assignment]
        sys.modules.pop("loopax.diffrax", None)
        importlib.import_module("loopax.diffrax")
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def _diffrax_unsafe_brownian():
    diffrax = pytest.importorskip("diffrax")
    import loopax.diffrax

    path = diffrax.UnsafeBrownianPath(shape=(), key=jax.random.key(0))
    terms = diffrax.ControlTerm(lambda t, y, args: y, path)
    loopax.diffrax.CheckpointedAdjoint().loop(
        terms=terms,
        solver=diffrax.Euler(),
        saveat=diffrax.SaveAt(t1=True),
        init_state=None,
        max_steps=16,
        throw=True,
        passed_solver_state=False,
        passed_controller_state=False,
    )


def _replicated_leaf_with_per_device_trip_count():
    """One device is enough: the predicate's type varies over the mesh axis."""
    mesh = jax.make_mesh((1,), ("x",))
    spec = jax.sharding.PartitionSpec("x")

    def per_device(t0, x):
        def body(c):
            i, t, y = c
            return i + 1, t * 0.5, jnp.sin(y) * t

        steps = jnp.round(x[0] * 3).astype(jnp.int32)  # varies over "x"
        out = loopax.while_loop(lambda c: c[0] < steps, body, (0, t0, x), checkpoints=2)
        return out[2]

    def loss(t0, x):
        shard = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(jax.sharding.PartitionSpec(), spec),
            out_specs=spec,
        )
        return jnp.sum(shard(t0, x) ** 2)

    x = jax.device_put(jnp.array([0.5, 1.0]), jax.sharding.NamedSharding(mesh, spec))
    jax.grad(loss)(jnp.array(0.9), x)


_TRIGGERS = {
    "kind": lambda: toy_loop(kind="foo"),
    "scan-kind": lambda: loopax.scan(
        lambda c, x: (c, x), 0.0, jnp.ones(2), kind="bounded"
    ),
    "max-steps": lambda: toy_loop(max_steps=-1),
    "static-int": lambda: jax.jit(lambda m: toy_loop(kind="lax", max_steps=m))(3),
    "max-steps-int32": lambda: toy_loop(max_steps=2**31),
    "checkpoints": lambda: toy_loop(checkpoints=0),
    "base": lambda: toy_loop(kind="bounded", max_steps=3, base=1),
    "bounded-needs-max-steps": lambda: toy_loop(kind="bounded"),
    "fori-bounded-needs-max-steps": lambda: jax.jit(
        lambda n: loopax.fori_loop(0, n, lambda i, v: v, 0.0, kind="bounded")
    )(3),
    "auto-needs-budget": lambda: toy_loop(checkpoints="auto"),
    "budget-without-auto": lambda: toy_loop(checkpoints=4, memory_budget="1GiB"),
    "memory-budget-value": lambda: toy_loop(checkpoints="auto", memory_budget="lots"),
    "memory-budget-type": lambda: toy_loop(checkpoints="auto", memory_budget=1.5),
    "memory-budget-positive": lambda: toy_loop(checkpoints="auto", memory_budget=0),
    "budget-too-small": lambda: toy_loop(checkpoints="auto", memory_budget=4),
    "budget-no-bytes": lambda: loopax.checkpoints_for_budget(
        {"b": jnp.zeros(3)}, "1KiB", buffers=lambda c: c["b"]
    ),
    "budget-symbolic": lambda: _export(
        lambda x: loopax.while_loop(
            lambda c: c[0] < 3,
            toy_body,
            (0, x),
            checkpoints="auto",
            memory_budget="1MB",
        )
    ),
    "check-buffers-type": lambda: toy_loop(check_buffers=1),
    "not-callable": lambda: loopax.while_loop(3, toy_body, toy_init()),
    "fori-body-not-callable": lambda: loopax.fori_loop(0, 3, None, 0.0),
    "scan-f-not-callable": lambda: loopax.scan(None, 0.0, jnp.ones(2)),
    "cond-output": lambda: loopax.while_loop(lambda c: c[0], toy_body, toy_init()),
    "body-output": lambda: loopax.while_loop(
        toy_cond, lambda c: (c[0] + 1, c[1].astype(jnp.float16)), toy_init()
    ),
    "scan-f-pair": lambda: loopax.scan(lambda c, x: c, 0.0, jnp.ones(2)),
    "scan-f-carry": lambda: loopax.scan(
        lambda c, x: (c.astype(jnp.float16), x), jnp.float32(0.0), jnp.ones(2)
    ),
    "fori-bounds-shape": lambda: loopax.fori_loop(
        0, jnp.ones(2, int), lambda i, v: v, 0.0
    ),
    "fori-bounds-dtypes": lambda: loopax.fori_loop(
        jnp.int16(0), jnp.int32(3), lambda i, v: v, 0.0
    ),
    "checkpoint-bytes": lambda: loopax.while_loop(
        lambda c: c[0, 0] < 3.0,
        lambda c: c + 1.0,
        jnp.zeros((1024, 1024)),
        checkpoints=2**20 + 1,
    ),
    "buffer-returned-as-array": lambda: loopax.while_loop(
        toy_cond, lambda c: (c[0] + 1, jnp.ones(3)), toy_init(), buffers=lambda c: c[1]
    ),
    "fori-bounds-type": lambda: loopax.fori_loop(0, 3.0, lambda i, v: v, 0.0),
    "scan-reverse": lambda: loopax.scan(
        lambda c, x: (c, x), 0.0, jnp.ones(2), reverse=1
    ),
    "scan-length": lambda: loopax.scan(lambda c, x: (c, x), 0.0, None, length=-1),
    "scan-length-symbolic": lambda: _export(
        lambda x: loopax.scan(lambda c, xi: (c, c), 0.0, x)
    ),
    "scan-length-traced": lambda: jax.jit(
        lambda n: loopax.scan(lambda c, x: (c, x), 0.0, None, length=n)
    )(3),
    "scan-xs-scalar": lambda: loopax.scan(lambda c, x: (c, x), 0.0, jnp.array(1.0)),
    "scan-xs-lengths": lambda: loopax.scan(
        lambda c, x: (c, x), 0.0, (jnp.ones(2), jnp.ones(3))
    ),
    "scan-length-mismatch": lambda: loopax.scan(
        lambda c, x: (c, x), 0.0, jnp.ones(2), length=3
    ),
    "scan-needs-length": lambda: loopax.scan(lambda c, x: (c, x), 0.0, None),
    "buffers-not-callable": lambda: toy_loop(buffers=3),
    "buffers-call-failed": lambda: toy_loop(buffers=lambda c: c["missing"]),
    "buffers-not-in-carry": lambda: toy_loop(buffers=lambda c: jnp.zeros(3)),
    "buffers-scalar": lambda: loopax.while_loop(
        lambda c: c[0] < 3,
        lambda c: (c[0] + 1, c[1]),
        (jnp.array(0), jnp.zeros(3)),
        buffers=lambda c: c[0],
    ),
    "buffer-not-an-array": lambda: loopax.while_loop(
        lambda c: c[0] < 3,
        lambda c: (c[0] + 1, jnp.sin(c[1])),
        (jnp.array(0), jnp.zeros(3)),
        buffers=lambda c: c[1],
    ),
    "second-write": lambda: _buffer_loop(lambda c: (c[0] + 1, c[1].at[0].set(1.0))),
    "unwritten-read": lambda: _buffer_loop(
        lambda c: (c[0] + 1, c[1].at[c[0]].set(c[1][2]))
    ),
    "out-of-bounds": lambda: _buffer_loop(
        lambda c: (c[0] + 1, c[1].at[c[0] + 3].set(1.0))
    ),
    "lax-reverse-mode": lambda: jax.grad(
        lambda x: loopax.while_loop(toy_cond, toy_body, (0, x), kind="lax")[1].sum()
    )(jnp.ones(3)),
    "needs-checkpoints": lambda: jax.grad(
        lambda x: loopax.while_loop(lambda c: c < 3.0, lambda c: c + x, x)
    )(1.0),
    "schedule-int": lambda: loopax.schedule(num_steps=2.5, checkpoints=1),
    "schedule-non-negative": lambda: loopax.schedule(num_steps=-1, checkpoints=1),
    "schedule-positive": lambda: loopax.schedule(num_steps=3, checkpoints=0),
    "known-length": lambda: loopax.schedule(num_steps=3, checkpoints=1, known_length=1),
    "suggest-needs-target": lambda: loopax.suggest_checkpoints(10),
    "suggest-budget-needs-carry": lambda: loopax.suggest_checkpoints(
        10, memory_budget="1KiB"
    ),
    "suggest-carry-without-budget": lambda: loopax.suggest_checkpoints(
        10, max_recompute_factor=2.0, carry=jnp.ones(3)
    ),
    "recompute-factor-type": lambda: loopax.suggest_checkpoints(
        10, max_recompute_factor="2"
    ),
    "recompute-factor-value": lambda: loopax.suggest_checkpoints(
        10, max_recompute_factor=0.5
    ),
    "recompute-vs-budget": lambda: loopax.suggest_checkpoints(
        20, max_recompute_factor=1.0, memory_budget=4096, carry=jnp.ones(256)
    ),
    "plot-needs-matplotlib": _no_matplotlib,
    "clients-missing": _client_missing,
    "diffrax-unsafe-brownian": _diffrax_unsafe_brownian,
    "shard-map-varying-trip-count": _replicated_leaf_with_per_device_trip_count,
    "internal": lambda: trace(
        types.SimpleNamespace(actions=[("bogus", 0, 0)], num_forward=0)
    ),
}


def test_every_entry_has_a_trigger():
    assert sorted(_parse_catalogue()) == sorted(_TRIGGERS)


@pytest.mark.parametrize("anchor", sorted(_TRIGGERS))
def test_entry_message_matches(anchor):
    messages, types_ = _parse_catalogue()[anchor]
    with pytest.raises(types_) as info:
        _TRIGGERS[anchor]()
    text = str(info.value)
    assert any(re.search(_pattern(m), text, re.DOTALL) for m in messages), (
        f"{anchor}: none of {messages} matches the raised message:\n{text}"
    )


# -- every message in the source is catalogued ----------------------------------------


def _template(node: ast.AST, local: dict[str, ast.AST]) -> str:
    """The static text of a message expression, with `…` for run-time parts."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_template(v, local) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _template(node.left, local) + _template(node.right, local)
    if isinstance(node, ast.Name) and node.id in local:
        return _template(local[node.id], local)
    return _HOLE


def _normalise(template: str) -> str:
    template = re.sub(r"\{[a-z_]+\}", _HOLE, template)  # str.format fields
    return re.sub(f"{_HOLE}+", _HOLE, template)


def _source_messages() -> list[tuple[str, str]]:
    """`(where, template)` for every readable raise message and message constant."""
    found = []
    for path in sorted(_SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(_ROOT))
        constants = {
            node.targets[0].id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        }
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and "HINT" not in node.targets[0].id
            ):
                text = _normalise(_template(node.value, constants))
                if len(text.replace(_HOLE, "")) >= 40:
                    found.append((f"{where}:{node.lineno}", text))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            local = constants | {
                n.targets[0].id: n.value
                for n in ast.walk(fn)
                if isinstance(n, ast.Assign)
                and len(n.targets) == 1
                and isinstance(n.targets[0], ast.Name)
            }
            for n in ast.walk(fn):
                if isinstance(n, ast.Raise) and isinstance(n.exc, ast.Call):
                    if not n.exc.args:
                        continue
                    text = _normalise(_template(n.exc.args[0], local))
                    if text.replace(_HOLE, "").strip():
                        found.append((f"{where}:{n.lineno}", text))
    return sorted(set(found))


def _covers(entry: str, template: str) -> bool:
    """Whether a catalogue message and a source template describe the same error:
    either, read as a pattern with `…` matching anything, matches the other."""
    return bool(
        re.search(_pattern(entry), template, re.DOTALL)
        or re.search(_pattern(template), entry, re.DOTALL)
    )


def test_source_has_messages():
    # Guard against the scan silently finding nothing.
    assert len(_source_messages()) > 40


@pytest.mark.parametrize("where,template", _source_messages())
def test_source_message_is_catalogued(where, template):
    entries = [m for messages, _ in _parse_catalogue().values() for m in messages]
    assert any(_covers(entry, template) for entry in entries), (
        f"{where}: this error message is not in docs/errors.md; add an entry with its "
        f"cause and fix (and a trigger in tests/test_error_catalogue.py):\n{template}"
    )


def test_catalogue_pattern_rejects_other_messages():
    """The matching is not vacuous: an unrelated message matches no entry."""
    entries = [m for messages, _ in _parse_catalogue().values() for m in messages]
    assert not any(_covers(e, "`frobnicate` must be purple, got 3.") for e in entries)
