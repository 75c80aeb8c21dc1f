"""Checkpoints: HF <-> megatron converters and atomic, resumable training checkpoints.

- ``convert``: ``convert_hf_to_mcore`` / ``convert_mcore_to_hf`` (single process, streamed).
- ``state``: ``save_checkpoint`` / ``load_checkpoint`` (model, optimizer, RNG, extra JSON).
- ``io``: atomic publish, ``latest`` pointer, pruning, file-size manifest (no torch).
- ``dist``: the adapter in front of megatron's ``dist_checkpointing``.
- ``cli``: the ``megatron-rl convert`` subcommand.
"""
