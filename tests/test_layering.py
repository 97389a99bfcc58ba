"""Layering: the synthetic world imports no training stack, models use only public names of losses, and the
library's range checks need no command-line library."""
import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlhf_jax"
TRAINING = ("rlhf_jax.train", "rlhf_jax.models", "rlhf_jax.losses", "rlhf_jax.eval", "rlhf_jax.generation",
            "rlhf_jax.lora", "rlhf_jax.sharding")


def _loaded_after(statement: str) -> set[str]:
    """The modules loaded by a fresh interpreter that runs `statement` (an import)."""
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    return set(out.split())


def test_rlhf_jax_itself_imports_nothing():
    found = {"jax", "flax", "optax", "numpy"} & _loaded_after("import rlhf_jax")
    assert not found, f"import rlhf_jax loads {sorted(found)}"


def test_the_world_is_numpy_only():
    loaded = _loaded_after("import rlhf_jax.tasks")
    found = {"jax", "flax", "optax", "tyro"} & loaded
    assert not found, f"import rlhf_jax.tasks loads {sorted(found)}"
    training = {m for m in loaded if m.startswith(TRAINING)}
    assert not training, f"rlhf_jax.tasks imports training code: {sorted(training)}"


def test_models_generation_and_lora_take_their_checks_from_rlhf_jax_checks():
    loaded = _loaded_after("import rlhf_jax.models, rlhf_jax.generation, rlhf_jax.lora, rlhf_jax.train")
    assert "rlhf_jax.checks" in loaded
    found = {"rlhf_jax.config_cli", "tyro"} & loaded
    assert not found, f"the library loads the command-line module: {sorted(found)}"


def _imports(path: pathlib.Path):
    """(module, name) for each `from module import name` of a source file (`import module` gives name None)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield from ((node.module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)


def test_models_use_only_public_names_of_losses():
    bad = []
    for path in sorted((PACKAGE / "models").glob("*.py")):
        for module, name in _imports(path):
            if not module.startswith("rlhf_jax.losses"):
                continue
            private_module = any(part.startswith("_") for part in module.split(".")[2:])
            if private_module or (name or "").startswith("_"):
                bad.append(f"{path.name}: from {module} import {name}")
    assert not bad, bad
