import random

import jax
import jax.random as jr
import pytest


# Strict promotion: loopax must never rely on implicit rank or dtype promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    """A function returning a fresh PRNG key each call (seeded per test)."""
    seed = random.Random(0)

    def _getkey():
        return jr.PRNGKey(seed.randint(0, 2**31 - 1))

    return _getkey
