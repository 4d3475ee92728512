"""The documentation stays true: every public name has an API page, every example
script runs, the code on each page runs, and the schedule drawn in the docs is the one
`loopax.schedule` replays.

Code blocks fenced as ```` ```python ```` are run, in order, one namespace per page;
fence a fragment that is not meant to run as ```` ```py ````.
"""

import contextlib
import io
import pathlib
import re
import subprocess
import sys
import types

import jax
import pytest

import loopax


DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
EXAMPLES = sorted(DOCS.glob("examples/*.py"))
PAGES = sorted(p for p in DOCS.rglob("*.md") if "api" not in p.parts)
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)


def _public_names() -> list[str]:
    names = getattr(loopax, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(loopax).items()
            if not name.startswith("_") and not isinstance(value, types.ModuleType)
        ]
    return sorted(names)


def test_every_public_name_has_an_api_page():
    documented = set()
    for page in DOCS.glob("api/*.md"):
        documented |= set(re.findall(r"^::: loopax\.(\w+)\s*$", page.read_text(), re.M))
    missing = [name for name in _public_names() if name not in documented]
    assert not missing, (
        f"public names missing from the API reference: {missing}. Add a line "
        "`::: loopax.<name>` to a page in docs/api/ (and the page to mkdocs.yml)."
    )


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script: pathlib.Path, tmp_path: pathlib.Path):
    args = []
    if script.name == "plot_schedule.py":
        pytest.importorskip("matplotlib")
        args = ["--out", str(tmp_path)]  # Leave the committed figures alone.
    result = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, (
        f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    )


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if _PYTHON_BLOCK.search(p.read_text())],
    ids=lambda p: p.relative_to(DOCS).as_posix(),
)
def test_page_code_runs(page: pathlib.Path):
    namespace = {"__name__": f"docs_{page.stem}"}
    # Readers run this code with JAX's default promotion rules, not the strict ones
    # that conftest.py sets for loopax itself.
    with (
        jax.numpy_rank_promotion("allow"),
        jax.numpy_dtype_promotion("standard"),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        for i, match in enumerate(_PYTHON_BLOCK.finditer(page.read_text())):
            code = compile(match.group(1), f"{page.name} (python block {i})", "exec")
            exec(code, namespace)


def test_schedule_picture_matches_replay():
    expected = str(loopax.schedule(6, 2))
    page = (DOCS / "how-it-works.md").read_text()
    assert f"```text\n{expected}\n```" in page, (
        "docs/how-it-works.md shows a schedule that `print(loopax.schedule(6, 2))` no "
        f"longer prints; replace it with:\n{expected}"
    )
