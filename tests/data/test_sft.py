"""SFT loss masks: exactly each assistant turn's content plus its end-of-turn token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from data_helpers import R1_BOS, R1_EOS, write_parquet

from megatron_rl.config.data import DataConfig
from megatron_rl.data.prompts import PromptStream
from megatron_rl.data.sft import SFTDataset, tokenize_transcript
from megatron_rl.data.template import ChatRenderer
from megatron_rl.errors import DataError

REASONED = "<think>\nSix and seven.\n</think>\n\n13"
MULTI = [
    {"role": "system", "content": "Answer with a number."},
    {"role": "user", "content": "6+7?"},
    {"role": "assistant", "content": "\n\n13 "},  # leading/trailing whitespace kept as is
    {"role": "user", "content": "And doubled?"},
    {"role": "assistant", "content": "26"},
]


def _trained_runs(tok: Any, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded text of each maximal run of trained tokens."""
    runs: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ids, mask)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(t)
    return [tok.decode(r) for r in runs]


def test_qwen2_mask_is_assistant_content_and_im_end(qwen_tok: Any) -> None:
    renderer = ChatRenderer(qwen_tok, DataConfig())
    ids, mask = tokenize_transcript(renderer, MULTI)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    assert _trained_runs(qwen_tok, ids, mask) == ["\n\n13 <|im_end|>", "26<|im_end|>"]
    assert qwen_tok.decode(ids) == renderer.render(MULTI, add_generation_prompt=False)
    assert mask[-1] == 0  # the newline after the last <|im_end|> is scaffolding
    # the first trained token is predicted right after the generation prompt
    first = mask.index(1)
    prompt = renderer.render(MULTI[:2], add_generation_prompt=True)
    assert qwen_tok.decode(ids[:first]) == prompt


def test_r1_fallback_mask_with_reasoning(r1_tok: Any) -> None:
    renderer = ChatRenderer(r1_tok, DataConfig())
    chat = [{"role": "user", "content": "6+7?"}, {"role": "assistant", "content": REASONED}]
    ids, mask = tokenize_transcript(renderer, chat)
    assert _trained_runs(r1_tok, ids, mask) == [REASONED[len("<think>\n"):] + R1_EOS]
    assert r1_tok.decode(ids) == f"{R1_BOS}<｜User｜>6+7?<｜Assistant｜>{REASONED}{R1_EOS}"
    assert ids.count(r1_tok.convert_tokens_to_ids(R1_BOS)) == 1


@pytest.mark.parametrize("chat, why", [
    ([{"role": "user", "content": "6+7?"}, {"role": "assistant", "content": "13"}],
     "no <think> opener: the generation prompt is not how the turn starts"),
    ([{"role": "user", "content": "6+7?"}, {"role": "assistant", "content": REASONED},
      {"role": "user", "content": "sure?"}, {"role": "assistant", "content": REASONED}],
     "the first turn's reasoning is dropped once a later turn follows"),
])
def test_r1_prefix_property_breaks_are_errors(tmp_path: Path, r1_tok: Any, chat: list,
                                              why: str) -> None:
    f = write_parquet(tmp_path / "sft.parquet", [{"messages": chat}])
    with pytest.raises(DataError, match=r"sft.parquet, row 0 .*`messages`.*prefix property") as e:
        SFTDataset.from_config(DataConfig(train_files=[str(f)]), r1_tok, max_len=512)
    assert "\n" not in str(e.value), why


def test_dataset_drops_long_transcripts_and_streams(tmp_path: Path, qwen_tok: Any) -> None:
    rows = [{"messages": [{"role": "user", "content": f"Say {'la ' * i}"},
                          {"role": "assistant", "content": "la " * i}]} for i in range(12)]
    f = write_parquet(tmp_path / "sft.parquet", rows, row_group_size=5)
    renderer = ChatRenderer(qwen_tok, DataConfig())
    lengths = [len(tokenize_transcript(renderer, r["messages"])[0]) for r in rows]
    ds = SFTDataset.from_config(DataConfig(train_files=[str(f)]), qwen_tok, max_len=40)
    keep = [i for i, n in enumerate(lengths) if n <= 40]
    assert 0 < len(keep) < 12 and len(ds) == len(keep) and ds.num_dropped == 12 - len(keep)
    ex = ds[len(ds) - 1]
    assert ex.uid == keep[-1] and len(ex.input_ids) == lengths[ex.uid] <= 40
    assert len(ex.loss_mask) == len(ex.input_ids)
    stream = PromptStream(ds, seed=0)
    assert sorted(e.uid for e in stream.take(len(ds))) == keep


@pytest.mark.parametrize("messages, what", [
    ([{"role": "user", "content": "hi"}], "no assistant message"),
    ([{"role": "assistant", "content": "hi"}], "starts with an assistant message"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "role 'robot'"),
])
def test_bad_transcripts(tmp_path: Path, qwen_tok: Any, messages: list, what: str) -> None:
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = write_parquet(tmp_path / "sft.parquet", [{"messages": ok}, {"messages": messages}])
    with pytest.raises(DataError, match=rf"row 1 \(0-based\), column `messages`: .*{what}"):
        SFTDataset.from_config(DataConfig(train_files=[str(f)]), qwen_tok, max_len=512)


def test_missing_messages_column(tmp_path: Path, qwen_tok: Any) -> None:
    f = write_parquet(tmp_path / "sft.parquet", [{"chat": "x"}])
    with pytest.raises(DataError, match="`messages` missing; the file has `chat`"):
        SFTDataset.from_config(DataConfig(train_files=[str(f)]), qwen_tok, max_len=512)
