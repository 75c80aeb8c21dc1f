"""SFT transcripts: chat parquet rendered through the chat template, with an assistant loss mask.

Mask rule: 1 on each assistant turn's tokens, up to and including the last special token the
template writes for that turn (its end of turn: ``<|im_end|>`` for Qwen2, ``<｜end▁of▁sentence｜>``
for R1-Distill); 0 on system and user turns, on template scaffolding (role headers, the
generation prompt) and on plain text after the end-of-turn token (Qwen2's newline).

How the turns are found: for each assistant message k, the template renders the transcript
up to k with the generation prompt, and up to and including k; both must be prefixes of the
whole transcript's text (the prefix property). The text between them is the assistant's.
Each piece is tokenized separately, so an assistant turn's tokens are exactly what the model
would generate after that prompt (the rollout engine tokenizes prompt and completion apart
too). A template that rewrites earlier turns (R1-Distill drops earlier reasoning) or whose
generation prompt is not how turns start breaks the property: that row is a DataError.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_rl.config.data import DataConfig
from megatron_rl.data.parquet import (
    ParquetSource,
    RowGroup,
    RowIndex,
    build_index,
    check_index,
    get_many,
)
from megatron_rl.data.schema import Message, Where, decode_messages
from megatron_rl.data.template import ChatRenderer
from megatron_rl.errors import DataError


@dataclass(frozen=True)
class SFTExample:
    """One tokenized transcript."""

    uid: int
    """Stable row id over all files (file order, then row order), dropped rows included."""
    input_ids: list[int]
    """The whole transcript's token ids; at most the dataset's max_len."""
    loss_mask: list[int]
    """Same length as input_ids; 1 where token i is trained (predicted from tokens < i)."""


def tokenize_transcript(renderer: ChatRenderer, messages: list[Message],
                        where: Where | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a transcript (module docstring for the rule)."""
    def fail(problem: str, fix: str) -> DataError:
        return where.error(problem, fix) if where else DataError(f"{problem}. {fix}")

    if renderer.template is None:
        raise DataError("SFT needs a chat template to find the assistant turns, but "
                        "`data.apply_chat_template` is false. Set it to true.")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise fail("the transcript has no assistant message, so nothing would be trained",
                   "Drop the row or add the assistant's reply.")
    if turns[0] == 0:
        raise fail("the transcript starts with an assistant message",
                   "Start it with a system or user message.")
    full = renderer.render(messages, add_generation_prompt=False, where=where)
    spans: list[tuple[int, int]] = []
    end = 0
    for k in turns:
        before = renderer.render(messages[:k], add_generation_prompt=True, where=where)
        through = renderer.render(messages[:k + 1], add_generation_prompt=False, where=where)
        if not (full.startswith(before) and full.startswith(through)
                and end <= len(before) <= len(through)):
            raise fail(
                f"the chat template breaks the prefix property at assistant message {k}: the text "
                "it renders for the messages before it (with the generation prompt) and through it "
                "is not a prefix of the whole transcript's text, so the assistant's tokens cannot "
                "be located (templates that rewrite earlier turns do this, e.g. R1-Distill drops "
                "earlier turns' reasoning up to `</think>`, and its generation prompt ends in "
                "`<think>` + newline, which assistant content must then start with)",
                "Use a template with the prefix property (`data.chat_template`), or split "
                "the transcript so each row ends at the turn that keeps its reasoning.")
        spans.append((len(before), len(through)))
        end = len(through)
    return _assemble(renderer, full, spans)


def _assemble(renderer: ChatRenderer, full: str,
              spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, stop in spans:
        scaffold = renderer.encode_segment(full[pos:start])
        turn = renderer.encode_segment(full[start:stop])
        specials = [j for j, t in enumerate(turn) if t in renderer.special_ids]
        n_trained = specials[-1] + 1 if specials else len(turn)
        ids += scaffold + turn
        mask += [0] * len(scaffold) + [1] * n_trained + [0] * (len(turn) - n_trained)
        pos = stop
    tail = renderer.encode_segment(full[pos:])
    return ids + tail, mask + [0] * len(tail)


class SFTDataset:
    """Transcripts of some parquet files that fit ``max_len`` tokens, in uid order."""

    def __init__(self, source: ParquetSource, renderer: ChatRenderer, max_len: int,
                 index: RowIndex | None = None) -> None:
        """Index ``source`` (check and tokenize every row) unless a prebuilt ``index`` is given."""
        if max_len <= 0:
            raise DataError(f"the SFT max length must be > 0, got {max_len}.")
        self.source = source
        self.renderer = renderer
        self.max_len = max_len
        self._key = renderer.cfg.messages_key
        self.index = index or build_index(source, self._measure, max_len, "the SFT max length")
        self.num_dropped = self.index.num_dropped

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, max_len: int,
                    files: Sequence[str] | None = None) -> SFTDataset:
        """Open ``files`` (default ``cfg.train_files``), check and tokenize every transcript."""
        source = ParquetSource(cfg.train_files if files is None else files,
                               required=[cfg.messages_key])
        return cls(source, ChatRenderer(tokenizer, cfg), max_len)

    def __len__(self) -> int:
        return len(self.index.uids)

    def __getitem__(self, i: int) -> SFTExample:
        uid = int(self.index.uids[check_index(i, len(self))])
        ref, row = self.source.row(uid)
        ids, mask = self._tokenize(self.source.paths[ref.file], ref.row_in_file, row)
        return SFTExample(uid, ids, mask)

    def get_many(self, indices: Sequence[int]) -> list[SFTExample]:
        """``[self[i] for i in indices]``, reading each row group once (uid order)."""
        return get_many(self, indices)

    def _tokenize(self, path: str, row_in_file: int,
                  row: dict[str, Any]) -> tuple[list[int], list[int]]:
        where = Where(path, row_in_file, self._key)
        return tokenize_transcript(self.renderer, decode_messages(row[self._key], where), where)

    def _measure(self, rg: RowGroup) -> list[int]:
        path = self.source.paths[rg.file]
        return [len(self._tokenize(path, rg.first_row_in_file + j, row)[0])
                for j, row in enumerate(rg.rows)]
