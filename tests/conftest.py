"""Test setup: CPU only, 8 simulated devices for sharding tests, float32 matmuls at full precision."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program when a test module ends. One process compiles some thousands of programs over
    the suite; keeping them all alive grew its memory, and late in a full run XLA's CPU compiler crashed
    (segfault, twice, in tests/test_train_steps.py, which passes on its own)."""
    yield
    jax.clear_caches()
