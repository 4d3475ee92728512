import os
import random

import jax
import jax.random as jr
import pytest


# The multi-device tests need 8 simulated devices, set before JAX initialises its
# backend: they run in a pytest invocation of their own (see multidevice/conftest.py).
collect_ignore = (
    []
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
    else ["multidevice"]
)

# Strict promotion: loopax must never rely on implicit rank or dtype promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_report_header(config):
    del config
    return (
        f"jax {jax.__version__}, jax_use_direct_linearize="
        f"{jax.config.jax_use_direct_linearize}, x64={jax.config.jax_enable_x64}"
    )


@pytest.fixture
def getkey():
    """A function returning a fresh PRNG key each call (seeded per test)."""
    seed = random.Random(0)

    def _getkey():
        return jr.PRNGKey(seed.randint(0, 2**31 - 1))

    return _getkey
