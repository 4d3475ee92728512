"""loopax reaches JAX's internals through one module only: `_jax_internals.py`.

Anything outside JAX's documented API (its private packages, the interpreter modules
and their rule registries, `jax.core`, `jax.extend`, aval attributes such as the
`shard_map` manual axis type) may change in any release; keeping it in one module
means a new JAX release is adapted to in one place. This test fails when any other
module of the package imports or touches such a name.
"""

import ast
import pathlib

import pytest


SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "loopax"
SEAM = SRC / "_jax_internals.py"

INTERNAL_MODULES = ("jax._src", "jax.interpreters", "jax.core", "jax.extend")
# Attributes that only exist on JAX's internal objects (tracers, avals, registries).
INTERNAL_ATTRIBUTES = {
    "mat",
    "pval",
    "primitive_jvps",
    "primitive_transposes",
    "primitive_batchers",
    "fancy_primitive_batchers",
    "custom_partial_eval_rules",
    "partial_eval_jaxpr_custom_rules",
    "dce_rules",
    "register_lowering",
    "lower_fun",
    "to_tangent_aval",
    "default_process_primitive",
    "instantiate_const",
    "new_instantiated_const",
    "def_impl",
    "def_abstract_eval",
    "def_effectful_abstract_eval",
}
INTERNAL_KEYWORDS = {"manual_axis_type"}


def _is_internal_module(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in INTERNAL_MODULES)


def _violations(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(SRC.parent)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [
                f"{where}: import {a.name}"
                for a in node.names
                if _is_internal_module(a.name)
            ]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            module = node.module or ""
            if _is_internal_module(module):
                found.append(f"{where}: from {module} import ...")
            elif module == "jax":
                found += [
                    f"{where}: from jax import {a.name}"
                    for a in node.names
                    if _is_internal_module(f"jax.{a.name}")
                ]
        elif isinstance(node, ast.Attribute) and node.attr in INTERNAL_ATTRIBUTES:
            found.append(f"{where}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg in INTERNAL_KEYWORDS:
            found.append(f"{where}: {node.arg}=")
    return found


def _package_modules() -> list[pathlib.Path]:
    return sorted(p for p in SRC.rglob("*.py") if p != SEAM)


def test_the_seam_exists_and_uses_internals():
    # Guards the test itself: if the seam stopped using internals, the scan would
    # be checking nothing.
    assert SEAM.exists()
    assert _violations(SEAM), "the seam module no longer touches JAX internals"


@pytest.mark.parametrize(
    "path", _package_modules(), ids=lambda p: str(p.relative_to(SRC))
)
def test_no_jax_internals_outside_the_seam(path):
    violations = _violations(path)
    assert not violations, (
        "JAX internals used outside src/loopax/_jax_internals.py; move them there:\n"
        + "\n".join(violations)
    )


def test_the_scan_detects_internal_uses(tmp_path):
    offender = tmp_path / "offender.py"
    offender.write_text(
        "from jax._src import core\n"
        "import jax.interpreters.ad\n"
        "from jax import core as c\n"
        "def f(aval, t):\n"
        "    return aval.mat, t.pval\n"
        "s = jax.ShapeDtypeStruct((), 'f', manual_axis_type=None)\n"
    )
    global SRC
    saved, SRC = SRC, tmp_path
    try:
        assert len(_violations(offender)) == 6
    finally:
        SRC = saved


# -- tests and benchmarks speak loopax's public API ---------------------------------

REPO = SRC.parents[1]
# The one documented module for test hooks: the pure checkpointing policy, whose
# internals (revolve costs, the online rule, the table length) tests check directly.
# `loopax.__main__` is the command line, public through `python -m loopax`.
ALLOWED_PRIVATE = ("loopax._schedule", "loopax.__main__")


def _private_loopax_imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
            if node.module == "loopax":
                names += [(node.lineno, f"loopax.{a.name}") for a in node.names]
    return [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for line, name in names
        if name.startswith("loopax._")
        and not any(name == a or name.startswith(a + ".") for a in ALLOWED_PRIVATE)
    ]


@pytest.mark.parametrize("folder", ["tests", "benchmarks"])
def test_tests_and_benchmarks_use_the_public_api(folder):
    found = [
        v
        for path in sorted((REPO / folder).rglob("*.py"))
        for v in _private_loopax_imports(path)
    ]
    assert not found, (
        "private loopax modules imported; use the public API or loopax._schedule "
        "(the documented test-hook module):\n" + "\n".join(found)
    )
