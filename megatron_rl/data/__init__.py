"""Training data: parquet prompt sets (RL) and chat transcripts (SFT), read by row group.

RL parquet schema (one row per problem; column names follow ``data.prompt_key`` /
``data.answer_key``):

=============== =================================================== =========================
column          type                                                meaning
=============== =================================================== =========================
``prompt``      string, or list<struct<role: string, content:       the question; a string is
                string>> (roles: system, user, assistant)           one user message
``answer``      string, or list<string>                             ground truth for the
                                                                    grader; for code, the
                                                                    tests as JSON text
``data_source`` string                                              picks the grader, splits
                                                                    the metrics
``extra_info``  optional: struct, map<string, _>, or a JSON object  free-form metadata, given
                string; null = {}                                   to the grader as a dict
=============== =================================================== =========================

SFT parquet holds ``messages`` (``data.messages_key``): list<struct<role, content>>.
Nulls are refused in every required column. Any malformed row raises
``megatron_rl.errors.DataError`` naming the file, the 0-based row and the column.

Modules: ``schema`` (cell checks), ``parquet`` (row-group reader, length index),
``template`` (tokenizer and chat template), ``prompts`` (``PromptDataset``,
``PromptStream``), ``sft`` (``SFTDataset``, loss masks), ``convert`` (DeepScaleR /
DeepCoder JSON to parquet; ``megatron-rl data``), ``benchmarks`` (evaluation benchmarks:
``math_benchmarks``, ``code_benchmarks``, ``lcb``; read by ``raw``, written by ``writer``),
``synthetic`` (the demo's arithmetic set).
Names are importable from here lazily, so ``import megatron_rl.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Problem": "prompts", "PromptDataset": "prompts", "PromptStream": "prompts",
    "epoch_order": "prompts", "SFTExample": "sft", "SFTDataset": "sft",
    "tokenize_transcript": "sft", "load_tokenizer": "template", "render_prompt": "template",
    "ChatRenderer": "template", "stop_token_ids": "template", "end_of_turn_ids": "template",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatron_rl.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatron_rl.data' has no attribute {name!r}")
