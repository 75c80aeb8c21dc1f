"""Rows of the embedded engine's running batch and their KV cache, for continuous batching.

A ``Rows`` is a set of sequences decoded by one forward per step. Their KV cache is a
transformers ``DynamicCache`` whose per-layer keys/values are ``[B, H, T, D]`` tensors,
**left-padded**: each row's real tokens are the rightmost ones, the attention mask marks them,
and positions are explicit per row, so rows of different lengths share one tensor. Rows join
(``merge``: the narrower cache is padded on the left, then the two are concatenated along
B), leave (``select``) and the columns no row uses any more are cut (``trim``) between two
steps. Keys are stored after rotary embedding, so a row's cached keys stay valid wherever its
padding puts them.

A ``Prefill`` is a set of newcomers (left-padded prompts) whose prompt is fed in column chunks
of at most ``chunk_tokens`` tokens (rows x columns), so a long prompt never stalls the running
batch's decoding for more than one chunk; once fed, it becomes ``Rows`` and joins the batch.

Legend: B = rows, T = cache width (columns, padding included), L = padded prompt length,
H = KV heads, D = head dim, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def mergeable(config: Any) -> bool:
    """Whether this model's ``DynamicCache`` has plain full-attention layers only (rows can merge).

    Sliding-window, quantised or linear-attention layers keep other state; for those the engine
    falls back to batches that start together (newcomers wait for the running batch to end)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


@dataclass
class Rows:
    """Sequences decoded together: one forward per step over ``next_B1`` with ``cache``."""

    jobs: list[Any]
    cache: Any
    """``DynamicCache`` holding ``mask_BT.shape[1]`` columns (left-padded)."""
    mask_BT: torch.Tensor
    """1 where the cache column holds a real token of the row."""
    pos_B1: torch.Tensor
    """Position of the token each row feeds next (= real tokens cached so far)."""
    next_B1: torch.Tensor
    """The last sampled token of each row, fed by the next forward."""

    @property
    def width(self) -> int:
        return int(self.mask_BT.shape[1])

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in that order), then cut the columns no row uses any more."""
        if len(keep) == len(self.jobs):
            return
        index = torch.tensor(keep, dtype=torch.long)
        _select_cache(self.cache, index)
        self.jobs = [self.jobs[r] for r in keep]
        self.mask_BT, self.pos_B1, self.next_B1 = self.mask_BT[index], self.pos_B1[index], self.next_B1[index]
        self.trim()

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row (left by rows that left)."""
        used_T = self.mask_BT.any(dim=0)
        first = int(used_T.to(torch.int8).argmax()) if bool(used_T.any()) else 0
        if first == 0:
            return
        self.mask_BT = self.mask_BT[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


@dataclass
class Prefill:
    """Newcomers whose prompts are being fed, left-padded, ``chunk_tokens`` at most per forward."""

    jobs: list[Any]
    ids_BL: torch.Tensor
    mask_BL: torch.Tensor
    pos_BL: torch.Tensor
    scoring: bool
    """Some row wants prompt log-probs: every chunk keeps all its logits."""
    solo: bool = False
    """A seeded job of deterministic mode: decoded alone, never merged."""
    fed: int = 0
    """Columns already fed."""
    cache: Any = None
    scores_BL: torch.Tensor | None = None
    """log p(ids[:, c + 1] | ids[:, :c + 1]) at column c (filled chunk by chunk when scoring)."""
    version: str | None = None
    """Weight version of the last chunk's forward."""
    last_logits_BV: torch.Tensor | None = None
    """Logits at the last column fed (the next-token logits once the prompt is all fed)."""

    @classmethod
    def of(cls, jobs: list[Any], *, solo: bool = False) -> Prefill:
        lengths = [len(j.prompt) for j in jobs]
        width = max(lengths)
        ids_BL = torch.zeros(len(jobs), width, dtype=torch.long)
        mask_BL = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, job in enumerate(jobs):
            ids_BL[row, width - lengths[row]:] = torch.tensor(job.prompt)
            mask_BL[row, width - lengths[row]:] = 1
        pos_BL = (mask_BL.cumsum(1) - 1).clamp(min=0)
        scoring = any(j.return_logprob and j.logprob_start_len >= 0 for j in jobs)
        scores = torch.zeros(len(jobs), width, dtype=torch.float32) if scoring else None
        return cls(jobs, ids_BL, mask_BL, pos_BL, scoring, solo, scores_BL=scores)

    @property
    def width(self) -> int:
        return int(self.ids_BL.shape[1])

    def select(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (aborted newcomers leave before their prompt is all fed)."""
        if len(keep) == len(self.jobs):
            return
        index = torch.tensor(keep, dtype=torch.long)
        if self.fed:
            _select_cache(self.cache, index)
        self.jobs = [self.jobs[r] for r in keep]
        self.ids_BL, self.mask_BL, self.pos_BL = self.ids_BL[index], self.mask_BL[index], self.pos_BL[index]
        if self.scores_BL is not None:
            self.scores_BL = self.scores_BL[index]
        if self.last_logits_BV is not None:
            self.last_logits_BV = self.last_logits_BV[index]

    def to_rows(self) -> Rows:
        """The fed prompts as decode rows (``next_B1`` is set by the first sampling)."""
        return Rows(self.jobs, self.cache, self.mask_BL, self.pos_BL[:, -1:] + 1,
                    torch.zeros(len(self.jobs), 1, dtype=torch.long))

    def next_chunk(self, chunk_tokens: int) -> tuple[int, int]:
        """Column range [start, end) of the next forward: at most ``chunk_tokens`` rows x columns."""
        cols = max(1, chunk_tokens // len(self.jobs))
        return self.fed, min(self.width, self.fed + cols)

    def record_scores(self, start: int, logits_BCV: torch.Tensor) -> None:
        """Prompt log-probs of the columns [start, start + C) from their logits (the last column has none)."""
        end = min(start + logits_BCV.shape[1], self.width - 1)
        if end <= start:
            return
        logp_BCV = torch.log_softmax(logits_BCV[:, :end - start].float(), dim=-1)
        target_BC = self.ids_BL[:, start + 1:end + 1]
        self.scores_BL[:, start:end] = logp_BCV.gather(2, target_BC.unsqueeze(2)).squeeze(2)

    def input_logprobs(self, row: int) -> list[float | None]:
        """SGLang's input_token_logprobs of the row's job: None for prompt position 0."""
        job = self.jobs[row]
        pad = self.width - len(job.prompt)
        scores = self.scores_BL[row, pad:self.width - 1].tolist()
        return ([None] + scores)[job.logprob_start_len:]


def _select_cache(cache: Any, index_B: torch.Tensor) -> None:
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.numel():
            layer.keys, layer.values = layer.keys[index_B], layer.values[index_B]


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Pad ``t`` with zeros on the left of dimension ``dim`` (counted from the end) to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (-dim - 1) + [missing, 0]
    return F.pad(t, pad)


def merge(a: Rows, b: Rows) -> Rows:
    """``a``'s rows then ``b``'s in one batch (``a``'s cache object is reused); both become invalid."""
    width = max(a.width, b.width)
    for la, lb in zip(a.cache.layers, b.cache.layers):
        la.keys = torch.cat([_left_pad(la.keys, width, -2), _left_pad(lb.keys, width, -2)])
        la.values = torch.cat([_left_pad(la.values, width, -2), _left_pad(lb.values, width, -2)])
    mask_BT = torch.cat([_left_pad(a.mask_BT, width, -1), _left_pad(b.mask_BT, width, -1)])
    return Rows(a.jobs + b.jobs, a.cache, mask_BT, torch.cat([a.pos_B1, b.pos_B1]),
                torch.cat([a.next_B1, b.next_B1]))
