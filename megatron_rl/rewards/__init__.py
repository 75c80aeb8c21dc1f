"""Reward functions (placeholder; API summary below once complete)."""
