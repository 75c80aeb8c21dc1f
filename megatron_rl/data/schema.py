"""Row validation: turn one parquet cell (as pyarrow's ``to_pylist`` gives it) into a typed value.

Every check names the file, the 0-based row and the column, and says what to change, because
a malformed row found at step 5,000 of a run is expensive; the datasets run these checks on
every row while building their index, before training starts.

Accepted cell values (pyarrow type -> Python value here):

* prompt: ``string`` -> ``str``; ``list<struct<role: string, content: string>>`` ->
  ``list[{"role", "content"}]`` (extra struct fields are dropped).
* answer: ``string`` -> ``str``; ``list<string>`` -> ``list[str]``. Never empty.
* data_source: ``string`` -> ``str``. Never empty.
* extra_info: a ``struct`` or ``map<string, _>`` -> ``dict``; a ``string`` holding a JSON
  object -> ``dict``; null or a missing column -> ``{}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from megatron_rl.errors import DataError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


@dataclass(frozen=True)
class Where:
    """A cell's address, for error messages: file path, 0-based row within the file, column."""

    path: str
    row: int
    column: str

    def error(self, problem: str, fix: str) -> DataError:
        """A one-paragraph DataError: where, what is wrong, what to change."""
        return DataError(f"{self.path}, row {self.row} (0-based), column `{self.column}`: "
                         f"{problem}. {fix}")


def _kind(value: Any) -> str:
    """A short description of a bad value for messages (type and a clipped repr)."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def decode_messages(value: Any, where: Where) -> list[Message]:
    """A list of {role, content} chat messages, roles among ROLES, contents strings."""
    if value is None:
        raise where.error("the value is null", "Give every row a list of {role, content} messages.")
    if not isinstance(value, list) or not value:
        raise where.error(f"expected a non-empty list of {{role, content}} messages, got "
                          f"{_kind(value)}", "Store messages as a list of structs with string "
                          "fields `role` and `content`.")
    out: list[Message] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise where.error(f"message {i} is {_kind(msg)}, not a {{role, content}} struct",
                              "Each message needs a string `role` and a string `content`.")
        for key in ("role", "content"):
            if msg.get(key) is None:  # arrow gives null for a struct field a row lacks
                raise where.error(f"message {i} lacks `{key}` (missing or null; it has "
                                  f"{sorted(k for k, v in msg.items() if v is not None)})",
                                  "Each message needs a string `role` and a string `content`.")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise where.error(f"message {i} has role {role!r}",
                              f"Roles must be one of {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise where.error(f"message {i} has content {_kind(content)}",
                              "Message content must be a string.")
        out.append({"role": role, "content": content})
    return out


def decode_prompt(value: Any, where: Where) -> str | list[Message]:
    """A prompt: a non-empty string, or chat messages (see ``decode_messages``)."""
    if isinstance(value, str):
        if not value.strip():
            raise where.error("the prompt is empty", "Drop the row or give it a prompt.")
        return value
    if isinstance(value, list):
        return decode_messages(value, where)
    if value is None:
        raise where.error("the value is null", "Give every row a prompt or drop the row.")
    raise where.error(f"expected a string or a list of {{role, content}} messages, got "
                      f"{_kind(value)}", "Store the prompt as text or as chat messages.")


def decode_answer(value: Any, where: Where) -> str | list[str]:
    """The ground truth: a non-empty string or a non-empty list of strings."""
    fix = "Store the answer as a string (or a list of strings); for code, the tests' JSON text."
    if value is None:
        raise where.error("the value is null", fix)
    if isinstance(value, str):
        if not value.strip():
            raise where.error("the answer is empty", "Drop the row or give it an answer.")
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise where.error(f"expected a string or a non-empty list of strings, got {_kind(value)}", fix)


def decode_data_source(value: Any, where: Where) -> str:
    """The grader / metrics key: a non-empty string."""
    if isinstance(value, str) and value.strip():
        return value
    raise where.error(f"expected a non-empty string, got {_kind(value)}",
                      "Set data_source to the name that picks the grader (e.g. `deepscaler`).")


def decode_extra_info(value: Any, where: Where) -> dict[str, Any]:
    """Free-form per-row metadata as a dict; null means {}."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in value):
        return dict(value)  # an arrow map comes back as (key, value) pairs
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except ValueError as e:
            raise where.error(f"the string is not JSON ({e})",
                              "Store extra_info as a struct, a map, or a JSON object string.") from e
        if isinstance(parsed, dict):
            return parsed
    raise where.error(f"expected a struct, a map or a JSON object string, got {_kind(value)}",
                      "Store extra_info as a struct, a map, or a JSON object string.")
