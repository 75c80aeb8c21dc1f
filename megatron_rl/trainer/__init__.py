"""The RL driver: ``megatron-rl train`` (``loop``) and ``megatron-rl sft`` (``sft``).

Modules, one concern each:
  launch      the trainer world: join torchrun/srun, or start it locally; signal forwarding
  samples     ``ScoredSample``: a rollout sample after grading (the trainer's unit of data)
  generate    generation with per-sample seeds, grading as samples arrive, dynamic sampling
  batching    samples -> micro-batches: token budget, DP balance, padding for CP/SP/PP
  gate        rollout-vs-trainer log-prob mismatch metrics and the gate after each sync
  logger      metrics.jsonl, samples.jsonl, progress, wandb
  resume      where a run starts: its own latest checkpoint, a previous stage, or fresh
  session     everything a run holds (actor, servers, reward pool, data) and its teardown
  loop        the RL step as named phases
  sft         supervised fine-tuning on chat data with the same actor and checkpoints
  export      the final Hugging Face export
"""
