"""jeat-jax: Joint Energy Adversarial Training (Zhu et al.) in JAX/Flax."""
