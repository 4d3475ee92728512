// Typeset the math of a page with KaTeX (served from this site, see hooks/katex.py).
// pymdownx.arithmatex (generic mode) leaves inline math as `\(...\)` in a
// `span.arithmatex` and display math as `\[...\]` in a `div.arithmatex`.
function loopaxRenderMath(root) {
  for (const element of root.querySelectorAll(".arithmatex")) {
    const text = element.textContent.trim();
    const display = text.startsWith("\\[");
    const tex = text.replace(/^\\[([]/, "").replace(/\\[)\]]$/, "");
    katex.render(tex, element, { displayMode: display, throwOnError: false });
  }
}

if (typeof document$ !== "undefined") {
  // mkdocs-material: also after instant navigation.
  document$.subscribe(({ body }) => loopaxRenderMath(body));
} else {
  document.addEventListener("DOMContentLoaded", () => loopaxRenderMath(document.body));
}
