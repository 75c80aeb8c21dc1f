"""Weights: HF <-> Megatron name mapping, export iterators, and the trainer -> rollout weight sync."""
