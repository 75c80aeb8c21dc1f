"""Where samples come from: one seeded completion of one problem at a time.

``NativeBackend`` speaks SGLang's ``/generate`` (SGLang, or the embedded engine) through
``rollout.RolloutClient`` (least-loaded server, retries on the survivors when one dies): the
prompt is rendered with the local tokenizer's chat template, as the trainer renders it, and
generation stops at the template's end-of-turn tokens. ``OpenAIBackend`` speaks
``/v1/chat/completions`` of any OpenAI-compatible server (vLLM, SGLang, a hosted API): the
server applies its own template; no local tokenizer is needed. Both return ``Completion``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from megatron_rl.errors import RolloutError
from megatron_rl.eval.problems import EvalProblem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingSettings:
    """How every sample is drawn."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768


@dataclass(frozen=True)
class Completion:
    """One sampled response."""

    text: str
    """The response as text (special tokens dropped)."""
    tokens: int
    """Response length in tokens."""
    finish_reason: str
    """stop, length, or abort (the server was paused or lost it: ask again)."""
    prefix: str = ""
    """Text the template's generation prompt already opened (e.g. ``<think>\\n``), which a
    transcript of the answer must start with."""


class Backend(Protocol):
    async def complete(self, problem: EvalProblem, seed: int) -> Completion: ...

    async def close(self) -> None: ...


class NativeBackend:
    """SGLang's native API through ``RolloutClient``, prompts rendered with ``tokenizer``."""

    def __init__(self, client: Any, tokenizer: Any, sampling: SamplingSettings, chat_template: str = ""):
        from megatron_rl.config.data import DataConfig
        from megatron_rl.data.template import ChatRenderer, stop_token_ids

        cfg = DataConfig(chat_template=chat_template)
        self.client, self.tokenizer, self.sampling = client, tokenizer, sampling
        self.renderer = ChatRenderer(tokenizer, cfg)
        self.stop_ids = tuple(stop_token_ids(tokenizer, cfg))
        self._prompts: dict[tuple[str, int], tuple[list[int], str]] = {}

    def prompt(self, problem: EvalProblem) -> tuple[list[int], str]:
        """(token ids, the text the generation prompt opened) of a problem, cached."""
        key = (problem.dataset, problem.index)
        if key not in self._prompts:
            text = self.renderer.prompt_text(problem.prompt)
            opened = "<think>\n" if text.endswith("<think>\n") else "<think>" if text.endswith("<think>") else ""
            self._prompts[key] = (self.renderer.encode([text])[0], opened)
        return self._prompts[key]

    async def complete(self, problem: EvalProblem, seed: int) -> Completion:
        from megatron_rl.rollout.types import RolloutRequest, SamplingParams

        ids, opened = self.prompt(problem)
        s = self.sampling
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                n=1, seed=seed, stop_token_ids=self.stop_ids)
        rid = f"eval-{problem.dataset}-{problem.index}-{seed}"
        (sample,) = await self.client.generate([RolloutRequest(rid, ids, params)])
        text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        return Completion(text, len(sample.response_ids), sample.finish_reason, opened)

    async def close(self) -> None:
        await self.client.close()


class OpenAIBackend:
    """``/v1/chat/completions`` of OpenAI-compatible servers, round robin, retried elsewhere."""

    def __init__(self, urls: list[str], model: str, sampling: SamplingSettings, *,
                 max_concurrency: int = 64, timeout_s: float = 3600.0, api_key: str | None = None):
        self.urls = [u.rstrip("/") for u in urls]
        self.model, self.sampling, self.timeout_s = model, sampling, timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._limit = asyncio.Semaphore(max_concurrency * len(self.urls))
        self._next = itertools.cycle(range(len(self.urls)))
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=self.headers)
        return self._session

    async def complete(self, problem: EvalProblem, seed: int) -> Completion:
        s = self.sampling
        body = {"model": self.model, "messages": problem.messages, "n": 1, "temperature": s.temperature,
                "top_p": s.top_p, "max_tokens": s.max_new_tokens, "seed": seed}
        failures = []
        start = next(self._next)
        async with self._limit:
            for k in range(len(self.urls)):
                url = self.urls[(start + k) % len(self.urls)]
                try:
                    reply = await self._post(url, body)
                except (aiohttp.ClientError, TimeoutError, _Retry) as e:
                    failures.append(f"{url}: {type(e).__name__}: {e}")
                    log.warning("chat completion failed on %s, trying another server: %s", url, e)
                    continue
                return parse_chat_reply(reply, url)
        raise RolloutError(f"Every server failed a chat completion: {'; '.join(failures)}. Check that "
                           "the URLs point at running OpenAI-compatible servers.")

    async def _post(self, url: str, body: dict) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._http().post(url + "/v1/chat/completions", json=body, timeout=timeout) as resp:
            text = await resp.text()
            if resp.status >= 500 or resp.status == 429:
                raise _Retry(f"HTTP {resp.status}: {text[:200]}")
            if resp.status >= 400:
                raise RolloutError(f"{url}/v1/chat/completions refused the request with HTTP {resp.status}: "
                                   f"{text[:300]}. Check --model (the served model's name) and the "
                                   "sampling options.")
            try:
                return await resp.json(content_type=None)
            except ValueError:
                raise RolloutError(f"{url}/v1/chat/completions answered with something that is not JSON: "
                                   f"{text[:200]!r}.") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Retry(Exception):
    """A server-side failure worth another server."""


def parse_chat_reply(reply: Any, url: str) -> Completion:
    """The first choice of a chat completion; a separate ``reasoning_content`` (vLLM and SGLang
    reasoning parsers) is put back in front as ``<think>...</think>``, as R1 wrote it."""
    try:
        choice = reply["choices"][0]
        message = choice["message"]
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
        tokens = int((reply.get("usage") or {}).get("completion_tokens") or 0)
        reason = choice.get("finish_reason") or "stop"
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise RolloutError(f"{url}/v1/chat/completions answered without choices[0].message: "
                           f"{str(reply)[:200]}. Is it an OpenAI-compatible server?") from None
    text = f"<think>\n{reasoning}\n</think>\n\n{content}" if reasoning else content
    return Completion(text, tokens, "length" if reason == "length" else "stop")


async def served_model_name(url: str) -> str:
    """The first model ``GET /v1/models`` lists (the name chat requests must carry)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(url.rstrip("/") + "/v1/models", timeout=aiohttp.ClientTimeout(total=30)) as r:
                body = await r.json(content_type=None)
            return str(body["data"][0]["id"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError) as e:
            raise RolloutError(f"{url}/v1/models did not name a model ({type(e).__name__}: {e}); pass the "
                               "served model's name with --served-model-name.") from None


async def speaks_native(url: str) -> bool:
    """Whether ``url`` answers SGLang's ``GET /get_model_info`` (else: OpenAI API only)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.get(url.rstrip("/") + "/get_model_info", timeout=aiohttp.ClientTimeout(total=30)) as r:
                return r.status == 200 and isinstance(await r.json(content_type=None), dict)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
