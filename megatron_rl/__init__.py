"""megatron-rl: reinforcement-learning post-training on megatron-core actors."""

__version__ = "0.1.0"
