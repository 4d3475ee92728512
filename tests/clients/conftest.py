import jax
import pytest


@pytest.fixture(autouse=True)
def standard_promotion():
    """Diffrax, Optimistix and Lineax are not written for the strict promotion the main
    suite enables (`tests/conftest.py`), so their tests run under JAX's defaults."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield
