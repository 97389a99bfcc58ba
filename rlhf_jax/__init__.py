"""rlhf_jax: LLM post-training (SFT, reward modelling, PPO, DPO) in JAX/Flax, built as pure functions."""

__version__ = "0.1.0"
