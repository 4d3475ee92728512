"""The nesting of `kind="bounded"`: how many levels of scans, each how long.

Pure integer policy, like the rest of `_schedule/`; the backend
(`_backends/bounded.py`) builds the scans.
"""


def bounded_plan(max_steps: int, base: int) -> tuple[int, int]:
    """Choose the nested scans: `depth` levels, each a scan of `length` blocks.

    `depth` is the fewest levels with `max_steps < 2 * base**depth` (1 for loops
    shorter than `2 * base`), and `length` the smallest with `length**depth >=
    max_steps`. A flat loop (`depth == 1`) is one scan of exactly `max_steps` steps.

    Why these choices:

    - The depth sets the cost of reverse mode: each step is evaluated `depth` times in
      forward sweeps (once, plus once per checkpointed level). Rounding `max_steps`
      up to a power of `base` (Equinox's rule) adds a level, a whole recomputation,
      just past each power; here a level is added only at `2 * base**k`, so
      `max_steps = base**k + 1` costs what `base**k` costs.
    - Every level has the same length, so the scans JAX builds for reverse mode have
      the same shapes at every level and share their lowered helper functions: with
      one level of a different length, compiling a gradient took ~10% longer
      (`base=16`, two levels of 16 under one of 4, 8, 15, 17 or 32). The bound stays
      exact without remainder scans of other lengths: the step counter stops the
      loop after `max_steps` calls, and the slots of the `length**depth` past
      `max_steps` are never run (each remaining block is one skipped `cond`).
    - `length <= ceil(2**(1 / depth) * base)`: reverse mode stores at most about
      `1.42 * base` carries per level.

    **Arguments:**

    - `max_steps`: the bound on the number of steps, an int `>= 1`.
    - `base`: sets the depth, as above; an int `>= 2`.

    **Returns:**

    `(length, depth)` with `(length - 1)**depth < max_steps <= length**depth`.
    """
    depth = 1
    while 2 * base**depth <= max_steps:
        depth += 1
    length = max(1, round(max_steps ** (1 / depth)))
    while length**depth < max_steps:  # Correct the float root, in exact integers.
        length += 1
    while length > 1 and (length - 1) ** depth >= max_steps:
        length -= 1
    return length, depth
