"""rlhf_jax: LLM post-training (SFT, reward model, PPO, DPO) in JAX/Flax as pure functions."""
from pathlib import Path

from setuptools import find_packages, setup


def _requirements(name):
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="rlhf_jax",
    version="0.2.0",
    description="LLM post-training (SFT, reward modelling, PPO, DPO) in JAX/Flax, built as pure functions.",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    entry_points={"console_scripts": ["rlhf-jax = rlhf_jax.cli:main"]},
    package_data={"rlhf_jax": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
    license="Apache-2.0",
)
