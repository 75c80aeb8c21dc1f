"""RL prompt sets: a length-filtered index over parquet files, and a resumable shuffled stream.

``PromptDataset`` reads and checks every row once at construction (one row group at a time),
keeping only (uid, prompt length) for the rows that fit ``data.max_prompt_len``; rows are
decoded again, from their row group, when asked for. ``PromptStream`` walks a dataset epoch
after epoch in an order that is a pure function of (seed, epoch), so a run resumed from
``state_dict()`` sees exactly the items an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from megatron_rl.config.data import DataConfig
from megatron_rl.data.parquet import (
    ParquetSource,
    RowGroup,
    RowIndex,
    build_index,
    check_index,
    get_many,
)
from megatron_rl.data.schema import (
    Where,
    decode_answer,
    decode_data_source,
    decode_extra_info,
    decode_prompt,
)
from megatron_rl.data.template import ChatRenderer
from megatron_rl.errors import DataError

DATA_SOURCE_KEY = "data_source"
EXTRA_INFO_KEY = "extra_info"


@dataclass(frozen=True)
class Problem:
    """One RL prompt, ready for a rollout request and the grader."""

    uid: int
    """Stable row id over all files (file order, then row order), dropped rows included."""
    prompt_ids: list[int]
    """The rendered prompt's token ids, generation prompt included; <= data.max_prompt_len."""
    answer: str | list[str]
    """Ground truth for the grader (code: the tests' JSON text)."""
    data_source: str
    """Picks the grader and splits the metrics."""
    extra_info: dict[str, Any]
    """Free-form metadata from the row ({} when the column is absent or null)."""


class PromptDataset:
    """Kept prompts of some parquet files, in uid order; ``len`` counts kept rows only."""

    def __init__(self, source: ParquetSource, renderer: ChatRenderer,
                 index: RowIndex | None = None) -> None:
        """Index ``source`` (check and measure every row) unless a prebuilt ``index`` is given."""
        self.source = source
        self.renderer = renderer
        cfg = renderer.cfg
        self._keys = (cfg.prompt_key, cfg.answer_key, DATA_SOURCE_KEY)
        self.index = index or build_index(source, self._measure, cfg.max_prompt_len,
                                          "data.max_prompt_len")
        self.num_dropped = self.index.num_dropped

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any,
                    files: Sequence[str] | None = None) -> PromptDataset:
        """Open ``files`` (default ``cfg.train_files``), check every row, filter by length."""
        source = ParquetSource(cfg.train_files if files is None else files,
                               required=[cfg.prompt_key, cfg.answer_key, DATA_SOURCE_KEY],
                               optional=[EXTRA_INFO_KEY])
        return cls(source, ChatRenderer(tokenizer, cfg))

    def __len__(self) -> int:
        return len(self.index.uids)

    def __getitem__(self, i: int) -> Problem:
        uid = int(self.index.uids[check_index(i, len(self))])
        ref, row = self.source.row(uid)
        return self._problem(uid, self.source.paths[ref.file], ref.row_in_file, row)

    def get_many(self, indices: Sequence[int]) -> list[Problem]:
        """``[self[i] for i in indices]``, reading each row group once (uid order)."""
        return get_many(self, indices)

    def _measure(self, rg: RowGroup) -> list[int]:
        path = self.source.paths[rg.file]
        texts = [self._decode(path, rg.first_row_in_file + j, row)[0]
                 for j, row in enumerate(rg.rows)]
        return [len(ids) for ids in self.renderer.encode(texts)]

    def _decode(self, path: str, row_in_file: int, row: dict[str, Any]) -> tuple[str, Problem]:
        """Check every cell of a row; return the prompt's text and a Problem without ids."""
        pk, ak, sk = self._keys
        prompt = decode_prompt(row[pk], Where(path, row_in_file, pk))
        problem = Problem(
            uid=-1, prompt_ids=[],
            answer=decode_answer(row[ak], Where(path, row_in_file, ak)),
            data_source=decode_data_source(row[sk], Where(path, row_in_file, sk)),
            extra_info=decode_extra_info(row.get(EXTRA_INFO_KEY), Where(path, row_in_file,
                                                                        EXTRA_INFO_KEY)))
        return self.renderer.prompt_text(prompt, Where(path, row_in_file, pk)), problem

    def _problem(self, uid: int, path: str, row_in_file: int, row: dict[str, Any]) -> Problem:
        text, p = self._decode(path, row_in_file, row)
        return Problem(uid, self.renderer.encode([text])[0], p.answer, p.data_source, p.extra_info)


T = TypeVar("T", covariant=True)


class Indexable(Protocol[T]):
    """What a stream needs of a dataset (PromptDataset, SFTDataset, a list)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> T: ...


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of ``epoch``: a permutation of range(size), a pure function of its args.

    Uses numpy's legacy ``RandomState`` (whose stream NumPy keeps fixed across versions, NEP
    19) seeded from a hash of (seed, epoch), so resumed runs agree with old ones.
    """
    if not shuffle:
        return np.arange(size, dtype=np.int64)
    digest = hashlib.sha256(f"megatron-rl:{seed}:{epoch}".encode()).digest()
    rng = np.random.RandomState(np.frombuffer(digest, dtype=np.uint32))
    return rng.permutation(size).astype(np.int64)


Item = TypeVar("Item")


class PromptStream(Generic[Item]):
    """An endless stream over a dataset: epoch after epoch, each in ``epoch_order``.

    ``epoch`` and ``position`` are those of the next item; crossing an epoch boundary inside
    ``take`` continues into the next epoch, so no call returns short and nothing is skipped.
    """

    def __init__(self, dataset: Indexable[Item], seed: int, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise DataError("the dataset is empty, so there is nothing to stream; check "
                            "`data.train_files` and the length limits.")
        self.dataset = dataset
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def take(self, n: int) -> list[Item]:
        """The next ``n`` items (continuing into later epochs as needed)."""
        if n < 0:
            raise ValueError(f"take(n) needs n >= 0, got {n}")
        indices: list[int] = []
        while len(indices) < n:
            order = self._epoch_order()
            stop = min(len(order), self.position + n - len(indices))
            indices.extend(int(i) for i in order[self.position:stop])
            self.position = stop
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        get_many = getattr(self.dataset, "get_many", None)
        return get_many(indices) if get_many else [self.dataset[i] for i in indices]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: {"epoch", "position", "seed", "shuffle", "size"}."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "size": len(self.dataset)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Resume at a saved position; refuses a state saved over different data or seed."""
        mine = self.state_dict()
        for key in ("seed", "shuffle", "size"):
            if key in d and d[key] != mine[key]:
                raise DataError(f"the saved data stream had {key}={d[key]!r} but this run has "
                                f"{key}={mine[key]!r}, so resuming would repeat or skip prompts. "
                                "Resume with the same data files, length limit and seed, or "
                                "start the stream afresh.")
        position = int(d["position"])
        if not 0 <= position < len(self.dataset):
            raise DataError(f"the saved data stream position {position} is outside the "
                            f"dataset's {len(self.dataset)} rows; the state is corrupt.")
        self.epoch, self.position = int(d["epoch"]), position

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(len(self.dataset), self.seed, self.epoch,
                                                   self.shuffle))
        return self._order[1]
