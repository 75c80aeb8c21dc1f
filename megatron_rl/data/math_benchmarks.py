"""Math benchmark records (AIME 2024/2025, MATH-500, AMC 2023, Minerva Math, OlympiadBench) as rows.

One row per problem: the problem with DeepScaleR's instruction (the one the training data
carries, so a model is scored on the prompt it was trained with), the reference answer as
text, and a ``data_source`` that ``trainer.generate.grader_kind`` maps to the math grader.
The public layouts read (field names as their owners publish them):

* AIME 2024: HuggingFaceH4/aime_2024 (``problem``, ``answer``, ``id``, ``url``, ``year``),
  Maxwell-Jia/AIME_2024 (``Problem``, ``Answer``, ``ID``), DeepScaleR's ``aime.json``.
* AIME 2025: opencompass/AIME2025 (``question``, ``answer``; parts I and II are two files),
  yentinglin/aime_2025 and math-ai/aime25 (``problem``, ``answer``, ``id``).
  AIME answers must be integers 0-999 (a wrong file shows at once); "033" is stored as "33".
* MATH-500: HuggingFaceH4/MATH-500 ``test.jsonl`` (``problem``, ``answer``, ``solution``,
  ``subject``, ``level``, ``unique_id``).
* AMC 2023: math-ai/amc23 and Qwen2.5-Math's ``amc23`` (``question``, ``answer``, which is a
  float there: 27.0 is stored as "27"), DeepScaleR's ``amc.json`` (``problem``, ``answer``).
* Minerva Math: Qwen2.5-Math's ``minerva_math/test.jsonl`` (``problem``, ``solution``; the
  answer is the solution's last ``\\boxed{}``, as Qwen's evaluation takes it), or files with
  an ``answer`` field (math-ai/minervamath: ``question``, ``answer``).
* OlympiadBench: Hothan/OlympiadBench and Qwen2.5-Math's ``olympiadbench`` (``question``,
  ``final_answer`` a list of ``$...$`` strings: the dollars are dropped and several parts
  joined by ", "; ``context`` put before the question when present). Problems with images
  (``image_1``... set, or an ``<img_...>`` mark in the text) are skipped and counted: the
  text-only English maths set is ``OE_TO_maths_en_COMP`` (675 problems).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_rl.data.convert import DEEPSCALER_SUFFIX, Fail, first_field
from megatron_rl.data.options import Options, Skip
from megatron_rl.rewards.math_extract import last_boxed

PROBLEM_KEYS = ("problem", "question", "Problem", "Question")
ANSWER_KEYS = ("answer", "Answer")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def answer_text(value: Any, key: str, fail: Fail) -> str:
    """A reference answer as text: integers as written, integral floats (27.0) as integers."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise fail(f"field `{key}` is a {type(value).__name__}, not an answer",
                   f"Store `{key}` as text or a number.")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(f"field `{key}` is {value}", "Give the problem a finite answer.")
        return str(int(value)) if value.is_integer() else repr(value)
    text = str(value).strip()
    if not text:
        raise fail(f"field `{key}` is empty", "Drop the record or fill the answer in.")
    return text


def _plain_answer(rec: dict[str, Any], fail: Fail) -> str:
    key, value = first_field(rec, ANSWER_KEYS, fail)
    return answer_text(value, key, fail)


def _aime_answer(rec: dict[str, Any], fail: Fail) -> str:
    key, value = first_field(rec, ANSWER_KEYS, fail)
    text = answer_text(value, key, fail).strip("$ ")
    if not re.fullmatch(r"\d{1,3}", text):
        raise fail(f"answer {text!r} is not an integer from 0 to 999, as every AIME answer is",
                   "Check that this is the AIME file (another benchmark's file was given?).")
    return str(int(text))


def _minerva_answer(rec: dict[str, Any], fail: Fail) -> str:
    if rec.get("answer") is not None:
        return answer_text(rec["answer"], "answer", fail)
    _, solution = first_field(rec, ("solution",), fail)
    boxed = last_boxed(solution) if isinstance(solution, str) else None
    if not boxed or not boxed.strip():
        raise fail("no `answer` field and no \\boxed{} answer in `solution`",
                   "Give Minerva Math as Qwen2.5-Math's minerva_math/test.jsonl or with an `answer` field.")
    return boxed.strip()


def _olympiad_answer(rec: dict[str, Any], fail: Fail) -> str:
    key, value = first_field(rec, ("final_answer", "answer"), fail)
    parts = value if isinstance(value, list) else [value]
    if not parts:
        raise fail(f"`{key}` is an empty list (a proof problem?)",
                   "Use OlympiadBench's open-ended (OE_...) files, whose problems have final answers.")
    texts = [_UNESCAPED_DOLLAR.sub("", answer_text(p, key, fail)).strip() for p in parts]
    if not all(texts):
        raise fail(f"`{key}` holds only `$` signs", "Drop the record or fill the answer in.")
    return ", ".join(texts)


def _olympiad_images(rec: dict[str, Any]) -> Skip | None:
    if any(rec.get(f"image_{i}") for i in range(1, 10)) or "<img_" in str(rec.get("question", "")):
        return Skip("problems with images")
    return None


@dataclass(frozen=True)
class MathSet:
    """How one math benchmark's records become rows."""

    data_source: str
    """The rows' data_source (a name ``grader_kind`` maps to the math grader)."""
    answer: Callable[[dict[str, Any], Fail], str]
    """The reference answer of a record."""
    meta: tuple[str, ...] = ()
    """Record fields copied into extra_info when present."""
    skip: Callable[[dict[str, Any]], Skip | None] | None = None
    """Why a record is left out (None: kept)."""

    def row(self, rec: Any, index: int, fail: Fail, options: Options) -> dict[str, Any] | Skip:
        """One record as a schema row, or a Skip with its reason."""
        key, problem = first_field(rec, PROBLEM_KEYS, fail)
        if self.skip is not None and (skipped := self.skip(rec)) is not None:
            return skipped
        if not isinstance(problem, str) or not problem.strip():
            raise fail(f"field `{key}` is {'empty' if isinstance(problem, str) else 'not text'}",
                       "Drop the record or give it the problem's text.")
        context = rec.get("context")
        if isinstance(context, str) and context.strip():
            problem = f"{context.strip()}\n\n{problem.strip()}"
        extra: dict[str, Any] = {"index": index}
        extra.update((k, rec[k]) for k in self.meta if rec.get(k) is not None)
        return {"prompt": [{"role": "user", "content": problem.strip() + DEEPSCALER_SUFFIX}],
                "answer": self.answer(rec, fail), "data_source": self.data_source,
                "extra_info": json.dumps(extra, default=str)}


AIME_META = ("id", "ID", "url", "year")
MATH_SETS: dict[str, MathSet] = {
    "aime2024": MathSet("aime2024", _aime_answer, AIME_META),
    "aime2025": MathSet("aime2025", _aime_answer, AIME_META),
    "math500": MathSet("math500", _plain_answer, ("unique_id", "subject", "level")),
    "amc2023": MathSet("amc2023", _plain_answer, ("id", "url")),
    "minerva": MathSet("minerva_math", _minerva_answer, ("idx", "type")),
    "olympiadbench": MathSet("olympiadbench", _olympiad_answer,
                             ("id", "subfield", "answer_type", "unit", "is_multiple_answer"),
                             _olympiad_images),
}
