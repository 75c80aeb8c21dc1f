"""Prompts to token ids through a chat template, exactly as the rollout engine will see them.

The rendered text already carries every special token the template wants (BOS included), so
it is encoded with ``add_special_tokens=False``: encoding it the ordinary way would add a
second BOS on tokenizers whose post-processor adds one (Llama-style, R1-Distill). The
template is authoritative, as in ``apply_chat_template(tokenize=True)``; only raw prompts
(``data.apply_chat_template: false``) get the BOS the tokenizer would add, and never an EOS.

Which template (``data.chat_template``): empty = the tokenizer's own, or DeepSeek-R1-Distill's
(shipped in ``templates/``) when the tokenizer has none; ``deepseek_r1_distill`` = that one;
a path ending in ``.jinja`` = that file.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from megatron_rl.config.data import DataConfig
from megatron_rl.data.schema import Message, Where
from megatron_rl.errors import DataError

R1_DISTILL = "deepseek_r1_distill"
TEMPLATE_DIR = Path(__file__).parent / "templates"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(model_path: str) -> Any:
    """The Hugging Face tokenizer of a local model directory (never downloads)."""
    path = Path(model_path)
    if not path.is_dir():
        raise DataError(f"{model_path}: not a directory, so no tokenizer can be loaded from it. "
                        "Point `model.path` at a local Hugging Face model directory.")
    if not any((path / name).exists() for name in _TOKENIZER_FILES):
        raise DataError(f"{model_path}: no tokenizer files (none of {', '.join(_TOKENIZER_FILES)}). "
                        "Copy the base model's tokenizer files into the directory.")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"{model_path}: the tokenizer files cannot be loaded ({e}). Replace them "
                        "with the base model's own tokenizer files.") from e


def resolve_chat_template(tokenizer: Any, cfg: DataConfig) -> str:
    """The Jinja source of the template ``cfg.chat_template`` selects (module docstring)."""
    choice = cfg.chat_template
    if choice == R1_DISTILL:
        return (TEMPLATE_DIR / f"{R1_DISTILL}.jinja").read_text()
    if choice.endswith(".jinja"):
        path = Path(choice)
        if not path.is_file():
            raise DataError(f"{choice}: no such chat template file. Fix `data.chat_template` "
                            f"(a .jinja path, `{R1_DISTILL}`, or empty for the tokenizer's own).")
        return path.read_text()
    if choice:
        raise DataError(f"`data.chat_template` is {choice!r}: expected a path ending in .jinja, "
                        f"`{R1_DISTILL}`, or empty for the tokenizer's own template.")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one renders chats
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        return own
    return (TEMPLATE_DIR / f"{R1_DISTILL}.jinja").read_text()


class ChatRenderer:
    """A tokenizer, the chat template the config picks, and how raw text gets its BOS."""

    def __init__(self, tokenizer: Any, cfg: DataConfig) -> None:
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.template = resolve_chat_template(tokenizer, cfg) if cfg.apply_chat_template else None

    def render(self, messages: list[Message], add_generation_prompt: bool,
               where: Where | None = None) -> str:
        """The template's text for ``messages`` (plus the generation prompt if asked)."""
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template or None,
                add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # jinja errors (raise_exception, undefined) have no common base
            fix = "Fix the row, or choose another `data.chat_template`."
            if where is None:
                raise DataError(f"the chat template failed on the messages ({e}). {fix}") from e
            raise where.error(f"the chat template failed on the messages ({e})", fix) from e
        if not isinstance(text, str):
            raise DataError(f"apply_chat_template returned {type(text).__name__}, not text; the "
                            "tokenizer's template machinery is not supported.")
        return text

    def prompt_text(self, prompt: str | list[Message], where: Where | None = None) -> str:
        """A prompt as the text to encode: through the template, or raw when that is off."""
        if self.template is None:
            if not isinstance(prompt, str):
                msg = ("the prompt is chat messages but `data.apply_chat_template` is false",
                       "Set `data.apply_chat_template: true` or store prompts as plain text.")
                raise where.error(*msg) if where else DataError(". ".join(msg))
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.render(messages, add_generation_prompt=True, where=where)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered prompts (batched), BOS added only to raw prompts (docstring)."""
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        bos = self.raw_bos_id
        if self.template is None and bos is not None:
            ids = [x if x[:1] == [bos] else [bos, *x] for x in ids]
        return [list(x) for x in ids]

    def encode_segment(self, text: str) -> list[int]:
        """Ids of one piece of a rendered transcript, no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    @cached_property
    def raw_bos_id(self) -> int | None:
        """The BOS id when the tokenizer adds one to plain text by itself, else None."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            return None
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos if probe[:1] == [bos] else None

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special token (named ones and added tokens flagged special)."""
        ids = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        for i, tok in (getattr(self.tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(tok, "special", False):
                ids.add(int(i))
        return frozenset(ids)


def render_prompt(tokenizer: Any, prompt: str | list[Message], cfg: DataConfig) -> list[int]:
    """Token ids of one prompt, ready for generation (template + generation prompt)."""
    renderer = ChatRenderer(tokenizer, cfg)
    return renderer.encode([renderer.prompt_text(prompt)])[0]


def end_of_turn_ids(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """The special token(s) the template writes right after an assistant turn's content.

    Found by rendering a one-exchange chat and encoding what follows the reply's text
    (Qwen2: ``[<|im_end|>]``; R1-Distill: ``[<｜end▁of▁sentence｜>]``). Empty when the template
    ends turns with plain text.
    """
    renderer = ChatRenderer(tokenizer, DataConfig(chat_template=cfg.chat_template))
    reply = "The answer is 4, says megatron-rl."
    text = renderer.render([{"role": "user", "content": "2+2"},
                            {"role": "assistant", "content": reply}], add_generation_prompt=False)
    if reply not in text:
        return []
    after = renderer.encode_segment(text[text.rindex(reply) + len(reply):])
    n = 0
    while n < len(after) and after[n] in renderer.special_ids:
        n += 1
    return after[:n]


def stop_token_ids(tokenizer: Any, cfg: DataConfig) -> list[int]:
    """Ids that end a generation: the template's end-of-turn specials, then the EOS id."""
    ids = end_of_turn_ids(tokenizer, cfg) if cfg.apply_chat_template else []
    eos = getattr(tokenizer, "eos_token_id", None)
    eos_ids = eos if isinstance(eos, list) else [eos]
    return list(dict.fromkeys([*ids, *(e for e in eos_ids if e is not None)]))
