"""SGLang's text semantics: how ``output_ids`` become the ``text`` of a reply.

Followed: SGLang v0.5.4, ``managers/detokenizer_manager.py`` (``trim_matched_stop``, the
incremental decode), ``Req.init_incremental_detokenize`` and ``Req.check_match_stop_str_prefix``
in ``managers/schedule_batch.py``, read from source. The rules:

- ``skip_special_tokens`` (default true) and ``spaces_between_special_tokens`` (default true)
  are passed to the tokenizer's ``decode``.
- Decoding starts with up to 5 prompt tokens as left context, and a chunk's text is
  ``decode(context + new) [len(decode(context)):]``, so a token's leading space or merged
  bytes come out as they would inside the full sequence.
- ``no_stop_trim`` false (default): a sample that stopped on a token (stop token or EOS,
  ``finish_reason.matched`` an int) has that token removed before decoding; one that stopped
  on a stop string has the text cut where the string starts. ``no_stop_trim`` true keeps
  both. ``output_ids`` and the log-probs are never trimmed. A falsy ``matched`` (token 0)
  trims nothing, as in SGLang.
- Text is released incrementally, and released text is never taken back: a chunk that
  ends in an incomplete UTF-8 character (U+FFFD) holds back to the last space (SGLang's
  ``find_printable_text``), and a streamed request skips a chunk while the tail of its
  output could still be the start of a stop string, so a stop string is not streamed and
  then trimmed.
- A non-streamed request is detokenized the same way, every 50 tokens
  (``DEFAULT_FORCE_STREAM_INTERVAL``) and at the end; ``final_text`` replays that.

This module is pure (a tokenizer in, strings out); ``http_server`` and ``openai_api`` call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_rl.rollout.sampling import BadRequest

CONTEXT_TOKENS = 5  # SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET
FORCE_OUTPUT_INTERVAL = 50  # SGLang's DEFAULT_FORCE_STREAM_INTERVAL: non-streamed requests
REPLACEMENT_CHAR = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


@dataclass(frozen=True)
class TextOptions:
    """The ``sampling_params`` fields that shape ``text`` (never the tokens)."""

    skip_special_tokens: bool = True
    """Drop special tokens (EOS, chat markers) from ``text``."""
    spaces_between_special_tokens: bool = True
    """Passed to ``tokenizer.decode`` (slow tokenizers put spaces around special tokens)."""
    no_stop_trim: bool = False
    """Keep the matched stop token / stop string in ``text``."""
    stop: tuple[str, ...] = ()
    """Stop strings, for holding back a streamed chunk that may be the start of one."""
    stream_interval: int = 1
    """Streamed requests: a chunk every this many tokens (SGLang's per-request override)."""


def bool_field(raw: dict[str, Any], key: str, default: bool = False, where: str = "") -> bool:
    """``raw[key]`` as a bool (absent or null: ``default``); BadRequest names ``where + key`` otherwise."""
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"`{where}{key}` must be true or false, got {value!r}.")
    return value


def text_options(raw: Any) -> TextOptions:
    """Read the text fields of one raw ``sampling_params`` object (validated elsewhere)."""
    if not isinstance(raw, dict):
        return TextOptions()
    stop = raw.get("stop") or []
    stop = (stop,) if isinstance(stop, str) else tuple(s for s in stop if isinstance(s, str) and s)
    interval = raw.get("stream_interval")
    if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
        raise BadRequest(f"sampling_params.stream_interval must be a positive integer, got {interval!r}.")
    return TextOptions(
        skip_special_tokens=bool_field(raw, "skip_special_tokens", True, "sampling_params."),
        spaces_between_special_tokens=bool_field(raw, "spaces_between_special_tokens", True, "sampling_params."),
        no_stop_trim=bool_field(raw, "no_stop_trim", False, "sampling_params."),
        stop=stop, stream_interval=interval or 1)


def trim_matched_stop(output: Any, finish: dict[str, Any] | None, no_stop_trim: bool) -> Any:
    """SGLang's rule: drop the matched stop token from ids, cut text where the stop string starts."""
    if no_stop_trim or not finish:
        return output
    matched = finish.get("matched")
    if not matched:
        return output
    if isinstance(matched, str) and isinstance(output, str):
        pos = output.find(matched)
        return output[:pos] if pos != -1 else output
    if isinstance(matched, int) and isinstance(output, list) and output:
        return output[:-1]  # the stop token is always the last token of a finished sample
    return output


def printable_prefix(text: str) -> str:
    """SGLang's ``find_printable_text``: the part of an unconfirmed chunk safe to release."""
    if text.endswith("\n"):
        return text
    if text and _is_cjk(ord(text[-1])):
        return text
    if len(text) > 1 and _is_cjk(ord(text[-2])):
        return text[:-1]
    return text[: text.rfind(" ") + 1]


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class IncrementalText:
    """One sample's detokenizer state: feed its output ids, get the cumulative ``text`` released.

    ``update(ids, finish)`` takes all output ids so far (it reads only the new ones) and
    the finish reason once finished; it returns the text released so far.
    """

    def __init__(self, tokenizer: Any, prompt: list[int], options: TextOptions):
        self.tokenizer, self.options = tokenizer, options
        context = list(prompt[-CONTEXT_TOKENS:])
        self._ids = context  # left context + output ids fed so far
        self._context_len = len(context)
        self._surr, self._read = 0, len(context)
        self._confirmed = ""  # decoded text of ids before _read
        self._sent = 0
        self._stop_tokens: int | None = None  # longest stop string, in tokens (computed once)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.options.skip_special_tokens,
                                     spaces_between_special_tokens=self.options.spaces_between_special_tokens)

    def update(self, output_ids: list[int], finish: dict[str, Any] | None = None) -> str:
        self._ids.extend(output_ids[len(self._ids) - self._context_len:])
        read_ids = trim_matched_stop(self._ids[self._surr:], finish, self.options.no_stop_trim)
        surr_text = self._decode(self._ids[self._surr:self._read])
        new_text = self._decode(read_ids)[len(surr_text):]
        if finish is None:
            if new_text and not new_text.endswith(REPLACEMENT_CHAR):
                self._confirmed += new_text
                self._surr, self._read = self._read, len(self._ids)
                new_text = ""
            else:
                new_text = printable_prefix(new_text)
        released = trim_matched_stop(self._confirmed + new_text, finish, self.options.no_stop_trim)
        self.text += released[self._sent:]
        self._sent = len(released)
        return self.text

    def may_stream(self, output_ids: list[int]) -> bool:
        """Whether SGLang sends a streamed chunk after this many tokens (interval, stop-prefix hold)."""
        count, interval = len(output_ids), self.options.stream_interval
        if not (count % interval == 1 if interval > 1 else count % interval == 0):
            return False
        return not self._tail_may_start_stop(output_ids)

    def _tail_may_start_stop(self, output_ids: list[int]) -> bool:
        if not self.options.stop:
            return False
        if self._stop_tokens is None:
            self._stop_tokens = max(len(self.tokenizer.encode(s, add_special_tokens=False)) for s in self.options.stop)
        # SGLang decodes the last (longest stop string in tokens + 2) ids, specials kept.
        tail = self.tokenizer.decode(output_ids[-min(self._stop_tokens + 2, len(output_ids)):])
        for stop in self.options.stop:
            if stop in tail or any(tail[-i:] == stop[:i] for i in range(1, min(len(tail), len(stop)) + 1)):
                return True
        return False


def final_text(tokenizer: Any, prompt: list[int], output_ids: list[int], finish: dict[str, Any] | None,
               options: TextOptions) -> str:
    """``text`` of a non-streamed reply: SGLang's detokenizer run every 50 tokens, then at the end."""
    if tokenizer is None:
        return ""
    state = IncrementalText(tokenizer, prompt, options)
    for count in range(FORCE_OUTPUT_INTERVAL, len(output_ids), FORCE_OUTPUT_INTERVAL):
        state.update(output_ids[:count])
    return state.update(output_ids, finish)
