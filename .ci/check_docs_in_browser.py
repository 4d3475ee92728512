"""Open every page of the built docs in headless Chromium and fail on what a reader
would see broken: math left as raw TeX (or a KaTeX error), an image that did not load,
a code block or table cut off on the right, or page content wider than its column.

Usage: python .ci/check_docs_in_browser.py [--site site] [--width 1280]
       [--chromium /usr/bin/chromium] [--screenshots DIR]

Drives Debian's `chromium` over the Chrome DevTools protocol on a pipe
(`--remote-debugging-pipe`: file descriptors 3 and 4, JSON messages ending in a NUL
byte), so it needs nothing beyond the standard library. Pages are opened as `file://`
URLs; the browser is told not to reach the network for anything of its own.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time


# Run in each page once it has loaded (and its fonts are ready); returns a list of
# problems, each `[what, detail]`.
_CHECKS = r"""
(async () => {
  await document.fonts.ready;
  const problems = [];
  const short = (text) => text.replace(/\s+/g, " ").trim().slice(0, 100);
  const lineAt = (element) => {
    // The longest line of a code block: the one that is cut.
    const lines = element.textContent.split("\n");
    return lines.reduce((a, b) => (b.length > a.length ? b : a), "");
  };

  // Math: every arithmatex element typeset, no KaTeX error, no TeX left in the text.
  for (const el of document.querySelectorAll(".arithmatex")) {
    if (!el.querySelector(".katex")) problems.push(["raw TeX", short(el.textContent)]);
  }
  for (const el of document.querySelectorAll(".katex-error")) {
    problems.push(["KaTeX error", short(el.getAttribute("title") || el.textContent)]);
  }
  const tex = /\\\(|\\\[|\\(frac|sum|log|lceil|rceil|le|ge|cdot|text|mathrm|approx)\b|\$[^$\s][^$\n]*\$/;
  const walker = document.createTreeWalker(
    document.querySelector(".md-content") || document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("pre, code, script, style, .katex, .arithmatex")) continue;
    if (tex.test(node.textContent)) problems.push(["raw TeX", short(node.textContent)]);
  }

  // Images that did not load.
  for (const img of document.images) {
    if (!img.complete || img.naturalWidth === 0) {
      problems.push(["broken image", img.getAttribute("src")]);
    }
  }

  // Horizontally cut content: code blocks, tables, display math, the article itself.
  const cut = (el) => el.scrollWidth > el.clientWidth + 1;
  for (const code of document.querySelectorAll(".md-typeset pre > code")) {
    if (cut(code) || cut(code.parentElement)) {
      problems.push(["cut code line", short(lineAt(code))]);
    }
  }
  for (const table of document.querySelectorAll(".md-typeset table")) {
    const box = table.closest(".md-typeset__scrollwrap") || table;
    if (cut(table) || cut(box)) {
      problems.push(["cut table", short(table.rows[0] ? table.rows[0].textContent : "")]);
    }
  }
  for (const math of document.querySelectorAll(".md-typeset div.arithmatex")) {
    if (cut(math)) problems.push(["cut display math", short(math.textContent)]);
  }
  const article = document.querySelector(".md-content .md-typeset");
  if (article) {
    const right = article.getBoundingClientRect().right;
    for (const el of article.querySelectorAll("p, li, h1, h2, h3, h4, table, pre, div.arithmatex, img")) {
      if (el.getBoundingClientRect().right > right + 1) {
        problems.push(["content wider than the page", el.tagName + ": " + short(el.textContent || el.src)]);
        break;
      }
    }
  }
  return problems;
})()
"""


class Browser:
    """Chromium with the DevTools protocol on a pipe."""

    def __init__(self, executable: str, user_data_dir: str):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # Move the child's ends above the range that dup2 to 3 and 4 could clobber.
        low = [to_child_r, from_child_w]
        child_r, child_w = (os.dup2(fd, 100 + i) for i, fd in enumerate(low))

        def preexec():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self._process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--no-first-run",
                "--no-default-browser-check",
                "--allow-file-access-from-files",
                "--hide-scrollbars",
                f"--user-data-dir={user_data_dir}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            preexec_fn=preexec,
            pass_fds=(3, 4, child_r, child_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_child_r, from_child_w, child_r, child_w):
            os.close(fd)
        self._write = os.fdopen(to_child_w, "wb", buffering=0)
        self._read = os.fdopen(from_child_r, "rb", buffering=0)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []

    def _receive(self) -> dict:
        while b"\0" not in self._buffer:
            chunk = self._read.read(1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._write.write(json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self._events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self._events):
                if event.get("method") == method and event.get("sessionId") == session:
                    del self._events[: i + 1]
                    return
            self._events.clear()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} within {timeout} s")
            self._events.append(self._receive())

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="site", type=pathlib.Path)
    parser.add_argument("--width", default=1280, type=int)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--screenshots", default=None, type=pathlib.Path)
    args = parser.parse_args()

    pages = sorted(
        p for p in args.site.resolve().rglob("index.html") if "assets" not in p.parts
    )
    if not pages:
        print(f"error: no pages under {args.site}; run `mkdocs build` first")
        return 2
    if args.screenshots is not None:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    failures = 0
    with tempfile.TemporaryDirectory(prefix="loopax-docs-chromium-") as profile:
        browser = Browser(args.chromium, profile)
        try:
            target = browser.send("Target.createTarget", url="about:blank")["targetId"]
            session = browser.send(
                "Target.attachToTarget", targetId=target, flatten=True
            )["sessionId"]
            browser.send("Page.enable", session)
            browser.send(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=args.width,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            for page in pages:
                name = page.parent.relative_to(args.site.resolve()).as_posix() or "."
                browser.send("Page.navigate", session, url=page.as_uri())
                browser.wait_for("Page.loadEventFired", session, timeout=30)
                result = browser.send(
                    "Runtime.evaluate",
                    session,
                    expression=_CHECKS,
                    awaitPromise=True,
                    returnByValue=True,
                )
                if "exceptionDetails" in result:
                    problems = [["check failed", str(result["exceptionDetails"])]]
                else:
                    problems = result["result"]["value"]
                if args.screenshots is not None:
                    import base64

                    shot = browser.send("Page.captureScreenshot", session, format="png")
                    file = name.replace("/", "_").strip("_.") or "home"
                    (args.screenshots / f"{file}.png").write_bytes(
                        base64.b64decode(shot["data"])
                    )
                status = "ok" if not problems else f"{len(problems)} problem(s)"
                print(f"{name:40} {status}")
                for what, detail in problems:
                    print(f"    {what}: {detail}")
                failures += bool(problems)
        finally:
            browser.close()
    print(f"\n{len(pages)} pages checked at {args.width} px; {failures} with problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
