"""OpenAI reply objects (SGLang v0.5.4's ``protocol.py`` shapes) from finished jobs and stream chunks.

Non-streamed: ``{"id", "object", "created", "model", "choices", "usage", "metadata":
{"weight_version"}}``; ``id`` is the first sample's rid, ``usage`` counts each prompt once
and every sample's completion tokens. Streamed completions: one event per chunk with the
text delta (the echo first), the new tokens' log-probs and, on a sample's last chunk, its
finish reason. Streamed chat: a ``{"role": "assistant", "content": ""}`` delta first per
sample, content deltas, then one finish chunk per sample after all content, as SGLang
sends them. Either ends with a usage chunk when ``stream_options.include_usage``.
"""

from __future__ import annotations

import time
from typing import Any

from megatron_rl.rollout.detokenize import final_text
from megatron_rl.rollout.engine import EmbeddedEngine, Job
from megatron_rl.rollout.serving import Submission


def model_card(engine: EmbeddedEngine) -> dict[str, Any]:
    return {"id": engine.model_path, "object": "model", "created": int(time.time()), "owned_by": "sglang",
            "root": engine.model_path, "max_model_len": engine.context_len}


def error_body(message: str, status: int = 400) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens, "prompt_tokens_details": None, "reasoning_tokens": 0}


def _finish(finish: dict[str, Any] | None) -> tuple[str | None, Any]:
    return (finish["type"], finish.get("matched")) if finish else (None, None)


class Format:
    """Builds one endpoint's replies; subclasses give the choice and chunk shapes."""

    object_name = ""

    def __init__(self, engine: EmbeddedEngine, body: dict[str, Any], subs: list[Submission]):
        self.engine, self.subs = engine, subs
        self.model = body.get("model") or "default"
        self.n = subs[0].params.n
        self.created = int(time.time())
        self.prompt_tokens: dict[int, int] = {}
        self.completion_tokens: dict[int, int] = {}
        self.last_id = ""

    def token_texts(self, ids: list[int]) -> list[str]:
        tok = self.engine.tokenizer
        return tok.batch_decode([[t] for t in ids]) if tok is not None and ids else [""] * len(ids)

    def response(self, jobs: list[Job], created: int) -> dict[str, Any]:
        choices = []
        for index, job in enumerate(jobs):
            sub = self.subs[index // self.n]
            text = final_text(self.engine.tokenizer, job.prompt, job.output_ids, job.finish, sub.options)
            choices.append(self.choice(index, job, text))
        prompt = sum(len(jobs[i].prompt) for i in range(0, len(jobs), self.n))
        return {"id": jobs[0].rid, "object": self.object_name, "created": created, "model": self.model,
                "choices": choices, "usage": usage(prompt, sum(len(j.output_ids) for j in jobs)),
                "metadata": {"weight_version": self.engine.weight_version}}

    def choice(self, index: int, job: Job, text: str) -> dict[str, Any]:
        raise NotImplementedError

    def chunk_events(self, index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def track(self, index: int, chunk: dict[str, Any]) -> None:
        meta = chunk["meta_info"]
        self.prompt_tokens[index], self.completion_tokens[index] = meta["prompt_tokens"], meta["completion_tokens"]
        self.last_id = meta["id"]

    def closing_events(self, include_usage: bool) -> list[dict[str, Any]]:
        if not include_usage:
            return []
        prompt = sum(t for i, t in self.prompt_tokens.items() if i % self.n == 0)
        return [{"id": self.last_id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [], "usage": usage(prompt, sum(self.completion_tokens.values()))}]

    chunk_object = ""


class CompletionFormat(Format):
    """/v1/completions: ``text_completion`` objects with legacy ``logprobs``."""

    object_name = chunk_object = "text_completion"

    def __init__(self, engine: EmbeddedEngine, body: dict[str, Any], subs: list[Submission], echoes: list[str]):
        super().__init__(engine, body, subs)
        self.echoes = echoes
        self.sent: dict[int, str] = {}
        self.logprobs_sent: dict[int, int] = {}

    def logprobs(self, entries: list[list[Any]]) -> dict[str, Any]:
        return {"text_offset": [-1] * len(entries), "token_logprobs": [e[0] for e in entries],
                "tokens": self.token_texts([e[1] for e in entries]), "top_logprobs": []}

    def choice(self, index: int, job: Job, text: str) -> dict[str, Any]:
        logprobs = None
        if job.return_logprob:
            entries = [[lp, t, None] for lp, t in zip(job.output_logprobs, job.output_ids)]
            if self.echoes:
                entries = [[lp, t, None] for lp, t in zip(job.input_logprobs, job.prompt)] + entries
            logprobs = self.logprobs(entries)
        if self.echoes:
            text = self.echoes[index // self.n] + text
        reason, matched = _finish(job.finish)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason, "matched_stop": matched}

    def chunk_events(self, index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self.track(index, chunk)
        meta, first = chunk["meta_info"], index not in self.sent
        text = chunk["text"]
        delta = (self.echoes[index // self.n] if first and self.echoes else "") + text[len(self.sent.get(index, "")):]
        self.sent[index] = text
        logprobs = None
        if "output_token_logprobs" in meta:
            entries = meta["output_token_logprobs"][self.logprobs_sent.get(index, 0):]
            if first and self.echoes:
                entries = meta["input_token_logprobs"] + entries
            self.logprobs_sent[index] = len(meta["output_token_logprobs"])
            logprobs = self.logprobs(entries)
        reason, matched = _finish(meta["finish_reason"])
        return [{"id": meta["id"], "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": [{"index": index, "text": delta, "logprobs": logprobs, "finish_reason": reason,
                              "matched_stop": matched}], "usage": None}]


class ChatFormat(Format):
    """/v1/chat/completions: ``chat.completion`` objects with per-token ``logprobs.content``."""

    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, engine: EmbeddedEngine, body: dict[str, Any], subs: list[Submission]):
        super().__init__(engine, body, subs)
        self.sent: dict[int, str] = {}
        self.logprobs_sent: dict[int, int] = {}
        self.finishes: dict[int, dict[str, Any]] = {}

    def logprobs(self, entries: list[list[Any]]) -> dict[str, Any]:
        texts = self.token_texts([e[1] for e in entries])
        return {"content": [{"token": text, "bytes": list(text.encode("utf-8")), "logprob": e[0], "top_logprobs": []}
                            for e, text in zip(entries, texts)]}

    def choice(self, index: int, job: Job, text: str) -> dict[str, Any]:
        logprobs = None
        if job.return_logprob:
            logprobs = self.logprobs([[lp, t, None] for lp, t in zip(job.output_logprobs, job.output_ids)])
        reason, matched = _finish(job.finish)
        message = {"role": "assistant", "content": text or None, "reasoning_content": None, "tool_calls": None}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason,
                "matched_stop": matched}

    def _chunk(self, meta_id: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": meta_id, "object": self.chunk_object, "created": int(time.time()), "model": self.model,
                "choices": [choice], "usage": None}

    @staticmethod
    def _delta(**fields: Any) -> dict[str, Any]:
        return {"role": None, "content": None, "reasoning_content": None, "tool_calls": None, **fields}

    def chunk_events(self, index: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        self.track(index, chunk)
        meta, events = chunk["meta_info"], []
        logprobs = None
        if "output_token_logprobs" in meta:
            logprobs = self.logprobs(meta["output_token_logprobs"][self.logprobs_sent.get(index, 0):])
            self.logprobs_sent[index] = len(meta["output_token_logprobs"])
        if meta["finish_reason"]:
            self.finishes[index] = meta["finish_reason"]
        if index not in self.sent:
            self.sent[index] = ""
            events.append(self._chunk(meta["id"], {"index": index, "delta": self._delta(role="assistant", content=""),
                                                   "logprobs": None, "finish_reason": None, "matched_stop": None}))
        delta = chunk["text"][len(self.sent[index]):]
        self.sent[index] = chunk["text"]
        if delta:
            events.append(self._chunk(meta["id"], {"index": index, "delta": self._delta(content=delta),
                                                   "logprobs": logprobs, "finish_reason": None, "matched_stop": None}))
        return events

    def closing_events(self, include_usage: bool) -> list[dict[str, Any]]:
        events = []
        for index, finish in self.finishes.items():
            reason, matched = _finish(finish)
            events.append(self._chunk(self.last_id, {"index": index, "delta": self._delta(), "logprobs": None,
                                                     "finish_reason": reason, "matched_stop": matched}))
        return events + super().closing_events(include_usage)
