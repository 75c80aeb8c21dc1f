"""Pieces of ``make demo``: a tiny tokenizer and a random tiny Qwen2 built from nothing."""
