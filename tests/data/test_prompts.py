"""PromptDataset's length filter and row-group reads; PromptStream's order and exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from data_helpers import write_parquet

from megatron_rl.config.data import DataConfig
from megatron_rl.data.prompts import PromptDataset, PromptStream, epoch_order
from megatron_rl.data.template import render_prompt
from megatron_rl.errors import DataError


def _rows(n: int) -> list[dict[str, Any]]:
    # prompt i says "word" i times, so prompt lengths grow with i; `blob` is never read
    return [{"prompt": "Count:" + " word" * i, "answer": str(i), "data_source": "count",
             "blob": "x" * 1000} for i in range(n)]


@pytest.fixture()
def counts_file(tmp_path: Path) -> Path:
    return write_parquet(tmp_path / "counts.parquet", _rows(40), row_group_size=6)


def test_length_filter_drops_and_counts_never_truncates(counts_file: Path, qwen_tok: Any) -> None:
    cfg = DataConfig(train_files=[str(counts_file)], max_prompt_len=40)
    lengths = [len(render_prompt(qwen_tok, r["prompt"], cfg)) for r in _rows(40)]
    keep = [i for i, n in enumerate(lengths) if n <= 40]
    assert 0 < len(keep) < 40  # the limit cuts through the file
    ds = PromptDataset.from_config(cfg, qwen_tok)
    assert len(ds) == len(keep) and ds.num_dropped == 40 - len(keep)
    assert [ds[i].uid for i in range(len(ds))] == keep
    for i in (0, len(ds) - 1):
        p = ds[i]
        assert len(p.prompt_ids) == lengths[p.uid]  # whole prompts only
        assert p.answer == str(p.uid)
    assert list(ds.index.lengths) == [lengths[u] for u in keep]


def test_nothing_fits(counts_file: Path, qwen_tok: Any) -> None:
    with pytest.raises(DataError, match="all 40 rows .* longer than data.max_prompt_len=5 tokens"):
        PromptDataset.from_config(DataConfig(train_files=[str(counts_file)], max_prompt_len=5),
                                  qwen_tok)


def test_reads_one_row_group_at_a_time(counts_file: Path, qwen_tok: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[int, tuple[str, ...]]] = []
    real = pq.ParquetFile.read_row_group

    def counting(self: pq.ParquetFile, i: int, columns: Any = None, **kw: Any) -> Any:
        reads.append((i, tuple(columns)))
        return real(self, i, columns=columns, **kw)

    def whole(*a: Any, **kw: Any) -> Any:
        raise AssertionError("a whole file was read")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    ds = PromptDataset.from_config(DataConfig(train_files=[str(counts_file)]), qwen_tok)
    assert len(ds) == 40
    assert [i for i, _ in reads] == list(range(7))  # the index pass: each group once, in order
    assert all(cols == ("prompt", "answer", "data_source") for _, cols in reads)  # not `blob`
    reads.clear()
    assert ds[13].uid == 13 and [i for i, _ in reads] == [2]  # rows 12..17
    assert ds[17].uid == 17 and len(reads) == 1  # same group: from the LRU
    reads.clear()
    got = ds.get_many([39, 0, 38, 1, 20, 37])  # groups 6, 0, 6, 0, 3, 6
    assert [p.uid for p in got] == [39, 0, 38, 1, 20, 37]
    assert sorted(i for i, _ in reads) == [0, 3, 6]
    assert len(ds.source._cache) <= 4  # bounded however much is read
    for i in range(40):
        ds[i]
    assert len(ds.source._cache) <= 4


@pytest.fixture()
def small_ds(tmp_path: Path, qwen_tok: Any) -> PromptDataset:
    f = write_parquet(tmp_path / "small.parquet", _rows(13), row_group_size=4)
    return PromptDataset.from_config(DataConfig(train_files=[str(f)]), qwen_tok)


def _uids(items: list[Any]) -> list[int]:
    return [p.uid for p in items]


def test_each_epoch_visits_every_row_once(small_ds: PromptDataset) -> None:
    stream = PromptStream(small_ds, seed=3)
    seen = _uids(stream.take(13 * 3 + 5))  # three whole epochs and a bit, in one call
    for e in range(3):
        assert sorted(seen[13 * e:13 * (e + 1)]) == list(range(13))
    assert seen[:13] != seen[13:26]  # reshuffled each epoch
    assert stream.epoch == 3 and stream.position == 5


def test_order_is_a_function_of_seed_and_epoch(small_ds: PromptDataset) -> None:
    a, b = PromptStream(small_ds, seed=7), PromptStream(small_ds, seed=7)
    assert _uids(a.take(30)) == _uids(b.take(30))
    assert _uids(PromptStream(small_ds, seed=8).take(13)) != _uids(PromptStream(small_ds, 7).take(13))
    assert _uids(PromptStream(small_ds, seed=7, shuffle=False).take(15)) == [*range(13), 0, 1]
    assert epoch_order(13, 7, 1).tolist() == epoch_order(13, 7, 1).tolist()
    # pinned: a numpy upgrade must not reorder resumed runs (legacy RandomState stream, NEP 19)
    assert epoch_order(6, 0, 0).tolist() == [0, 2, 5, 4, 1, 3]


def test_resume_equals_an_uninterrupted_stream(small_ds: PromptDataset) -> None:
    whole = PromptStream(small_ds, seed=11)
    expected = [_uids(whole.take(5)) for _ in range(8)]  # 40 items, crossing 3 epoch boundaries
    got: list[list[int]] = []
    state = None
    for _ in range(8):  # a new process per step: rebuild, restore, take, save
        stream = PromptStream(small_ds, seed=11)
        if state is not None:
            stream.load_state_dict(json.loads(state))
        got.append(_uids(stream.take(5)))
        state = json.dumps(stream.state_dict())
    assert got == expected
    assert json.loads(state) == {"epoch": 3, "position": 1, "seed": 11, "shuffle": True,
                                 "size": 13}


def test_resume_refuses_other_data_or_seed(small_ds: PromptDataset) -> None:
    state = PromptStream(small_ds, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1 but this run has seed=2"):
        PromptStream(small_ds, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="size=14"):
        PromptStream(small_ds, seed=1).load_state_dict({**state, "size": 14})


def test_stream_over_a_plain_list() -> None:
    stream = PromptStream(list("abcde"), seed=0)
    assert sorted(stream.take(5)) == list("abcde") and stream.epoch == 1
