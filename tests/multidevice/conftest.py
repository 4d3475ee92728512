"""Tests on 8 simulated CPU devices.

XLA reads `--xla_force_host_platform_device_count` when JAX first initialises its
backend, so it is set here, before any test creates an array. Run these tests in a
pytest invocation of their own (the default run ignores this directory, see
`tests/conftest.py`):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest -n 2 tests/multidevice

If JAX was initialised with fewer devices anyway, every test here is skipped.
"""

import os


_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    del config
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(
        reason=f"needs 8 devices, JAX has {jax.device_count()}: run "
        "`XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/multidevice`"
    )
    for item in items:
        if "multidevice" in str(item.fspath):
            item.add_marker(skip)
