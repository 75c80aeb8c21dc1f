"""Topology (process groups) and megatron-core CPU compatibility."""
