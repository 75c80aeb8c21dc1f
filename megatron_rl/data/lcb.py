"""LiveCodeBench (``livecodebench/code_generation_lite``) records as code-grader rows.

The Hugging Face dataset is one JSON Lines file per release increment: ``test.jsonl`` (v1),
``test2.jsonl`` (v2) ... ``test6.jsonl`` (v6). LiveCodeBench's loader names the selections:
``release_vN`` is ``test.jsonl`` up to ``testN.jsonl``, ``vN`` the one increment, ``vN_vM`` the
increments N to M, ``release_latest`` all. A record's fields: ``question_title``,
``question_content``, ``platform``, ``question_id``, ``contest_id``, ``contest_date`` (ISO),
``starter_code``, ``difficulty``, ``public_test_cases`` (JSON text of ``[{"input", "output",
"testtype"}]``), ``private_test_cases`` (the same JSON text, or for most problems that text
pickled, zlib-compressed and base64-encoded), ``metadata`` (JSON text; ``func_name`` for
LeetCode's functional problems).

Date windows follow LiveCodeBench's ``load_code_generation_dataset``: ``start <= contest_date
<= end`` with the dates read as midnight (DeepCoder's test set: 2024-08-01 .. 2025-02-01).

Private tests are never unpickled: unpickling runs whatever the file asks for. The pickle
LiveCodeBench writes holds one string (``pickle.dumps(json.dumps(tests))``), so the opcodes are
read with ``pickletools.genops``, a parser that executes nothing, and only the opcodes a pickled
string is made of are accepted; any other pickle is refused with the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import pickletools
import zlib
from datetime import datetime
from typing import Any

from megatron_rl.data.convert import Fail
from megatron_rl.errors import DataError

LCB_SOURCE = "livecodebench"
_INCREMENTS = ("test.jsonl",) + tuple(f"test{i}.jsonl" for i in range(2, 7))
RELEASE_FILES: dict[str, tuple[str, ...]] = {
    **{f"release_v{n}": _INCREMENTS[:n] for n in range(1, 7)},
    "release_latest": _INCREMENTS,
    **{f"v{n}": (_INCREMENTS[n - 1],) for n in range(1, 7)},
    **{f"v{a}_v{b}": _INCREMENTS[a - 1:b] for a in range(1, 7) for b in range(a + 1, 7)},
}
MAX_TESTS_BYTES = 1 << 30  # a decompressed private-test blob larger than this is refused
# The opcodes of a pickled str (or bytes) at protocols 0-5, and nothing else.
_STRING_OPS = {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
               "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_FRAMING_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def release_files(version: str) -> tuple[str, ...]:
    """The ``test*.jsonl`` names of a LiveCodeBench release version."""
    if version not in RELEASE_FILES:
        known = ", ".join(k for k in RELEASE_FILES if not k.startswith("v") or "_" not in k)
        raise DataError(f"--release-version {version!r} is not a LiveCodeBench release. Use one "
                        f"of {known}, or vN_vM (N < M <= 6) for the increments N to M.")
    return RELEASE_FILES[version]


def lcb_input_files(inputs: list[str], version: str | None) -> list[str]:
    """The files to read: a directory gives the version's files (or every ``test*.jsonl``
    when no version is named); with a version, named files must be exactly its files."""
    files: list[str] = []
    for path in inputs:
        if os.path.isdir(path):
            names = release_files(version) if version else sorted(
                n for n in os.listdir(path) if n.startswith("test") and n.endswith(".jsonl"))
            missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
            if not names:
                raise DataError(f"{path}: no test*.jsonl file in this directory. Download "
                                "livecodebench/code_generation_lite's JSONL files into it.")
            if missing:
                raise DataError(f"{path}: {', '.join(missing)} missing (LiveCodeBench {version} is "
                                f"{', '.join(names)}). Download them into this directory, or name "
                                "the release your files make up.")
            files += [os.path.join(path, n) for n in names]
        else:
            files.append(path)
    if version:
        wanted = release_files(version)
        extra = [f for f in files if os.path.basename(f) not in wanted]
        absent = [n for n in wanted if n not in {os.path.basename(f) for f in files}]
        if extra or absent:
            raise DataError(f"--release-version {version} is {', '.join(wanted)}, but the input "
                            f"{'has ' + ', '.join(extra) if extra else 'lacks ' + ', '.join(absent)}. "
                            "Give the directory of the downloaded files, exactly that version's "
                            "files, or no --release-version (then every given file is read).")
    return files


def parse_day(text: str, flag: str) -> datetime:
    """A ``YYYY-MM-DD`` command-line date as midnight (LiveCodeBench's reading)."""
    try:
        return datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise DataError(f"{flag} {text!r} is not a date; write it as YYYY-MM-DD, e.g. 2024-08-01.") from None


def contest_date(value: Any, fail: Fail) -> datetime:
    """A record's ``contest_date`` (ISO text, or a timestamp from parquet) as a naive datetime."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.strip()).replace(tzinfo=None)
        except ValueError:
            pass
    raise fail(f"`contest_date` {value!r} is not an ISO date", "Give the dataset's records as published.")


def unpickle_string(data: bytes) -> str:
    """The string a pickle holds, read without unpickling; ValueError for any other pickle."""
    found: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _STRING_OPS:
                found.append(arg.decode("utf-8") if isinstance(arg, bytes) else arg)
            elif op.name not in _FRAMING_OPS:
                raise ValueError(f"it holds the opcode {op.name}, so it is not a plain pickled string")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(str(e)) from None
    except Exception as e:  # genops reports truncated or unknown input in several types
        raise ValueError(f"it is not a valid pickle ({type(e).__name__}: {e})") from None
    if len(found) != 1:
        raise ValueError(f"it holds {len(found)} strings, not one")
    return found[0]


def decode_test_list(value: Any, field: str, fail: Fail) -> list[Any]:
    """``public_test_cases`` / ``private_test_cases``: a list, its JSON text, or (private) that
    text pickled, zlib-compressed and base64-encoded."""
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise fail(f"`{field}` is a {type(value).__name__}", "Give the dataset's records as published.")
    try:
        tests = json.loads(value)
    except ValueError:
        tests = _decode_compressed(value, field, fail)
    if not isinstance(tests, list):
        raise fail(f"`{field}` is not a list of tests", "Give the dataset's records as published.")
    return tests


def _decode_compressed(value: str, field: str, fail: Fail) -> Any:
    try:
        packed = base64.b64decode(value.encode("ascii"), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_TESTS_BYTES)
        if inflater.unconsumed_tail:
            raise fail(f"`{field}` inflates to more than {MAX_TESTS_BYTES >> 20} MiB",
                       "Drop the problem; no LiveCodeBench problem is that large.")
    except (UnicodeEncodeError, binascii.Error, zlib.error) as e:
        raise fail(f"`{field}` is neither JSON nor base64+zlib data ({e})",
                   "Give the dataset's records as published.") from None
    try:
        text = unpickle_string(raw)
    except ValueError as e:
        raise fail(f"`{field}` is compressed pickle data, and it was refused: {e}. A pickle is "
                   "never unpickled here (that can run code); LiveCodeBench's holds only the "
                   "tests' JSON text", "Give the dataset's records as published.") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise fail(f"`{field}` holds a string that is not JSON ({e})",
                   "Give the dataset's records as published.") from None
