"""A regression guard on the compiled gradient, not a timing (issue #19 item 4).

The body `sin(x) * 1.5` shows up as one `sine` per copy of the body in the optimized
HLO (its VJP needs only `cosine`). The checkpointed gradient has exactly two copies,
whatever `checkpoints` is: the forward sweep's tight loop and the backward sweep's
advance loop; the store-all path has one. A change that duplicates the body (a second
forward loop, a body inside both branches of a `cond`) adds a `sine` and fails here.
The controllers' instruction count is bounded too, and independent of `checkpoints`.
"""

import re

import jax
import jax.numpy as jnp
import pytest

import loopax


def _optimized_hlo(checkpoints, max_steps):
    def loss(x):
        def body(carry):
            i, x = carry
            return i + 1, jnp.sin(x) * 1.5

        _, y = loopax.while_loop(
            lambda carry: carry[0] < 50,
            body,
            (jnp.int32(0), x),
            checkpoints=checkpoints,
            max_steps=max_steps,
        )
        return jnp.sum(y)

    return jax.jit(jax.grad(loss)).lower(jnp.ones(3)).compile().as_text()


def _count(op, text):
    return len(re.findall(rf"\b{op}\(", text))


# Optimized HLO lines of the whole gradient, measured at about 4200 (unknown length;
# 5400 past 64 slots) and 2100 (max_steps=100) on jax 0.10.2, CPU; a bound with
# headroom for other jax versions, far below what a duplicated controller or body
# would add.
MAX_LINES = 7000


@pytest.mark.parametrize("max_steps", [None, 100])
def test_body_appears_twice_in_the_gradient(max_steps):
    lines = {}
    # (With `max_steps=100`, 1000 slots would store every step: the store-all path.)
    for checkpoints in (4, 64) if max_steps else (4, 64, 128, 1000):
        text = _optimized_hlo(checkpoints, max_steps)
        assert _count("sine", text) == 2, checkpoints
        assert _count("cosine", text) == 1, checkpoints
        lines[checkpoints] = text.count("\n")
        assert lines[checkpoints] <= MAX_LINES
    # The controllers' code does not grow with the number of checkpoints. With up
    # to 64 slots the online plan prices every stretch at once; with more it prices
    # them in chunks (a loop), a fixed ~1200 lines more since its sums are exact in
    # two int32 limbs (session 9), and nothing grows past that. Measured on jax
    # 0.10.2: 4157 and 4266 lines (c = 4, 64), 5397 and 5398 (c = 128, 1000).
    assert max(lines[4], lines[64]) <= 1.15 * min(lines[4], lines[64])
    if max_steps is None:
        assert lines[1000] <= 1.05 * lines[128]


def test_store_all_has_one_copy_of_the_body():
    text = _optimized_hlo(100, 100)
    assert _count("sine", text) == 1
    assert _count("cosine", text) == 1
