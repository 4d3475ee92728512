"""Collectives inside loop bodies, read from compiled HLO text."""

import re


_COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "collective-permute",
    "reduce-scatter",
    "all-to-all",
)
_CALLS = re.compile(
    r"(?:body|condition|calls|to_apply|true_computation|false_computation)=(%[\w.\-]+)"
    r"|branch_computations=\{([^}]*)\}"
)


def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?(%[\w.\-]+) ", line)
        if m and line.rstrip().endswith("{"):
            name = m.group(1)
            comps[name] = []
        elif name is not None:
            comps[name].append(line)
    return comps


def collectives_in_loops(text: str) -> int:
    """The number of collective operations in the bodies of `while` loops (and
    in every computation they call), each counted once."""
    comps = _computations(text)
    todo = [
        m.group(1)
        for lines in comps.values()
        for line in lines
        if " while(" in line
        for m in [re.search(r"body=(%[\w.\-]+)", line)]
        if m
    ]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            for m in _CALLS.finditer(line):
                if m.group(1):
                    todo.append(m.group(1))
                else:
                    todo += [c.strip() for c in m.group(2).split(",")]
    return sum(
        1
        for name in seen
        for line in comps[name]
        if any(re.search(rf"\b{c}(?:-start)?\(", line) for c in _COLLECTIVES)
    )
