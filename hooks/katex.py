"""mkdocs hook: render the site's math with KaTeX, served from the site itself.

The pages write math as `$...$` (pymdownx.arithmatex in generic mode, which leaves
`\\(...\\)` and `\\[...\\]` in `.arithmatex` elements). `docs/javascripts/math.js`
typesets them in the browser with KaTeX. The site loads nothing from other hosts, so
KaTeX's script, style sheet and fonts are copied into `site/assets/katex/` here, from
the `katex` npm package, which this hook installs (once, into the git-ignored
`.docs-assets/`) if it is not there yet. Needs `npm` (CI has it: pyright uses node).
"""

import json
import logging
import pathlib
import shutil
import subprocess


KATEX_VERSION = "0.16.22"
_ROOT = pathlib.Path(__file__).resolve().parent.parent
_PREFIX = _ROOT / ".docs-assets"
_DIST = _PREFIX / "node_modules" / "katex" / "dist"
_TARGET = "assets/katex"

log = logging.getLogger("mkdocs.hooks.katex")


def _installed_version() -> str | None:
    package = _DIST.parent / "package.json"
    if not package.exists():
        return None
    return json.loads(package.read_text()).get("version")


def _ensure_katex() -> None:
    if _installed_version() == KATEX_VERSION:
        return
    log.info("installing katex %s into %s", KATEX_VERSION, _PREFIX)
    _PREFIX.mkdir(exist_ok=True)
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "Rendering the docs' math needs the `katex` npm package, and `npm` is not "
            "installed: install Node.js and npm, then build again."
        )
    subprocess.run(
        [
            npm,
            "install",
            "--prefix",
            str(_PREFIX),
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            f"katex@{KATEX_VERSION}",
        ],
        check=True,
    )


def on_config(config):
    _ensure_katex()
    # KaTeX first, so that `docs/javascripts/math.js` (listed in mkdocs.yml) finds it.
    config.extra_css.insert(0, f"{_TARGET}/katex.min.css")
    config.extra_javascript.insert(0, f"{_TARGET}/katex.min.js")
    return config


def on_post_build(config):
    target = pathlib.Path(config.site_dir) / _TARGET
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copy2(_DIST / "katex.min.js", target)
    shutil.copy2(_DIST / "katex.min.css", target)
    shutil.copytree(_DIST / "fonts", target / "fonts")
