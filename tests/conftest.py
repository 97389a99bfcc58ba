"""Test setup: CPU only, 8 simulated devices for sharding tests, float32 matmuls at full precision, and XLA's CPU
backend without its optimisation passes: nearly every test compiles much more than it runs (tiny models, a few
steps), and these passes were about half of the compile time (GRPO and online-DPO tests: 212 s -> 121 s). The one
test that mostly executes (the main job's --quick path, tests/_pipeline_e2e.py) runs in its own process with
RLHF_JAX_TEST_XLA_OPT=1, which keeps the optimisations (it was 25% slower without them)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAGS = " --xla_force_host_platform_device_count=8"
if os.environ.get("RLHF_JAX_TEST_XLA_OPT") != "1":
    _FLAGS += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FLAGS).strip()

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


LONGEST = ("tests/test_pipeline.py::test_quick_pipeline_writes_report_and_resumes",
           "tests/test_rule_world.py::test_rule_world_command_quick_on_dev_keys")
"""The end-to-end tests, each minutes long: collected first, so that on two workers (pytest.ini) each starts at
once beside the rest of the suite instead of running alone at its end."""


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.nodeid not in LONGEST)      # stable: the rest keeps its order
