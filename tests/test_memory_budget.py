"""`memory_budget` bounds the checkpointing machinery's memory (issue #22).

The compiled gradient's XLA temporaries (`memory_analysis().temp_size_in_bytes`) are
the stored checkpoints, the controllers' working memory and the body's own working
memory (the current state, its cotangent: a few carries). The first two must fit in
the budget, so the whole must stay below `budget + 3 * carry` (plus 64 KiB of
scalars), for carries from 8 bytes to 64 MiB. Nothing is run: each gradient is only
lowered and compiled from `jax.ShapeDtypeStruct`s.
"""

import jax
import jax.numpy as jnp
import pytest

import loopax


def _gradient_temp_bytes(carry_floats: int, budget, max_steps=None) -> int:
    def loss(x):
        def body(carry):
            i, x = carry
            return i + 1, jnp.sin(x)

        _, y = loopax.while_loop(
            lambda carry: carry[0] < 1000,
            body,
            (jnp.int32(0), x),
            checkpoints="auto",
            memory_budget=budget,
            max_steps=max_steps,
        )
        return jnp.sum(y)

    x = jax.ShapeDtypeStruct((carry_floats,), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    memory = compiled.memory_analysis()
    if memory is None:
        pytest.skip("this backend reports no memory analysis")
    return memory.temp_size_in_bytes


@pytest.mark.parametrize(
    "carry_floats, budget",
    [
        (1, 2**20),  # 8-byte carry (with the counter): ~1000 slots.
        (1, "1GiB"),  # Capped at MAX_AUTO_CHECKPOINTS slots.
        (1023, 2**20),  # 4 KiB carry.
        (2**24 - 1, "256MiB"),  # 64 MiB carry: 3 slots.
    ],
)
def test_budget_bounds_gradient_temporaries(carry_floats, budget):
    carry_bytes = 4 * (carry_floats + 1)
    temp = _gradient_temp_bytes(carry_floats, budget)
    limit = loopax._schedule.parse_memory_budget(budget)
    assert temp <= limit + 3 * carry_bytes + 2**16, (temp, limit, carry_bytes)


def test_controller_memory_does_not_grow_past_the_cap():
    """A larger budget buys no more slots past the cap, so no more scratch."""
    assert _gradient_temp_bytes(1, "64MiB") == _gradient_temp_bytes(1, "1GiB")
