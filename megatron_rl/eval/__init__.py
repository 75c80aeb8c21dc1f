"""Benchmark evaluation and distillation-trace generation (``megatron-rl eval`` / ``generate``).

Modules:

* ``metrics``   pure functions: avg@n with its 95% interval, unbiased pass@k, maj@n, length and
  truncation; the trainer's periodic evaluation (``trainer.metrics.eval_metrics``) uses them too.
* ``problems``  parquet benchmark rows (the training schema) -> ``EvalProblem``.
* ``backends``  where samples come from: SGLang's native ``/generate`` (SGLang or the embedded
  engine, token ids through the local tokenizer) or any OpenAI-compatible chat server.
* ``sampling``  n seeded samples per problem, graded by ``data_source``, appended to
  ``samples.jsonl`` as they finish; what is already there is skipped (resume).
* ``records``   the ``samples.jsonl`` record and its reader (a torn last line is dropped).
* ``report``    ``results.json`` and ``results.md`` (one table per dataset, a comparison table
  across models).
* ``models``    ``--model`` values: HF directories, megatron-rl checkpoints (exported to HF
  once, under ``OUT/models/``), globs; starting or attaching the servers per model.
* ``traces``    graded samples -> the chat parquet ``megatron-rl sft`` reads.

Layering: ``eval`` sits beside ``trainer`` under ``cli``; it uses rollout, rewards, data,
checkpoint and the trainer's sampling helpers (``trainer.generate``: per-sample seeds, grader
by data source); ``trainer.metrics`` imports only ``eval.metrics`` (pure).
"""
