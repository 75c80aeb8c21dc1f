"""Math benchmark files in their public layouts, converted through `megatron-rl data NAME`.

Each raw file is written here in the layout its owners publish (field names, JSON / JSONL /
parquet), converted as a user types it, and checked row by row: prompt, answer, data_source
(and that ``grader_kind`` sends it to the math grader, which accepts a correct response).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_rl.data.convert import DEEPSCALER_SUFFIX
from megatron_rl.eval.problems import load_problems
from megatron_rl.rewards.math import grade_math
from megatron_rl.trainer.generate import grader_kind

CLI = str(Path(sys.executable).parent / "megatron-rl")
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`megatron-rl ARGS` as a user runs it (launcher variables stripped)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def write_raw(path: Path, records: list[dict[str, Any]], fmt: str) -> Path:
    """Records as the public file would hold them: "json" list, "jsonl" or "parquet"."""
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=1))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["extra_info"] = json.loads(r["extra_info"])
    return rows


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text + DEEPSCALER_SUFFIX}]


# name -> (files: [(name, format, records)], expected (prompt text, answer, extra_info subset))
CASES: dict[str, tuple[list[tuple[str, str, list[dict[str, Any]]]], list[tuple[str, str, dict]]]] = {
    "aime2024": (  # HuggingFaceH4/aime_2024 (parquet) and Maxwell-Jia/AIME_2024's capitalised fields
        [("aime24.parquet", "parquet", [
            {"id": 60, "problem": "Find $m+n$.", "solution": "...", "answer": "204",
             "url": "https://artofproblemsolving.com/x", "year": "2024"},
            {"id": 61, "problem": "Find $k$.", "solution": "...", "answer": "033", "url": "u", "year": "2024"}]),
         ("maxwell.jsonl", "jsonl", [{"ID": "2024-II-4", "Problem": "Find $r$.", "Solution": "s", "Answer": 80}])],
        [("Find $m+n$.", "204", {"id": 60, "year": "2024"}), ("Find $k$.", "33", {"id": 61}),
         ("Find $r$.", "80", {"ID": "2024-II-4"})]),
    "aime2025": (  # opencompass/AIME2025: two JSONL files, `question`/`answer`
        [("aime2025-I.jsonl", "jsonl", [{"question": "Part I problem.", "answer": "70"}]),
         ("aime2025-II.jsonl", "jsonl", [{"question": "Part II problem.", "answer": "0"}])],
        [("Part I problem.", "70", {}), ("Part II problem.", "0", {})]),
    "math500": (  # HuggingFaceH4/MATH-500 test.jsonl
        [("test.jsonl", "jsonl", [
            {"problem": "Convert $(0,3)$ to polar.", "solution": "... $\\boxed{(3,\\frac{\\pi}{2})}$",
             "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
             "unique_id": "test/precalculus/807.json"}])],
        [("Convert $(0,3)$ to polar.", "\\left( 3, \\frac{\\pi}{2} \\right)",
          {"subject": "Precalculus", "level": 2, "unique_id": "test/precalculus/807.json"})]),
    "amc2023": (  # math-ai/amc23: `question`, float `answer`
        [("amc23.jsonl", "jsonl", [{"id": 0, "question": "How many?", "answer": 27.0, "url": "u"},
                                   {"id": 1, "question": "What ratio?", "answer": 0.5, "url": "u"}])],
        [("How many?", "27", {"id": 0}), ("What ratio?", "0.5", {"id": 1})]),
    "minerva": (  # Qwen2.5-Math minerva_math/test.jsonl: the answer is the solution's last box
        [("test.jsonl", "jsonl", [
            {"problem": "Compute the speed.", "solution": "So $v = \\boxed{3 \\times 10^{8}}$ m/s.",
             "type": "Relativity (8.033 Fall 2006)", "idx": 0},
            {"question": "Give the mass.", "answer": "2.5"}])],  # math-ai/minervamath
        [("Compute the speed.", "3 \\times 10^{8}", {"idx": 0}), ("Give the mass.", "2.5", {})]),
    "olympiadbench": (  # Hothan/OlympiadBench OE_TO_maths_en_COMP (+ one image problem, skipped)
        [("OE_TO_maths_en_COMP.parquet", "parquet", [
            {"id": 1606, "question": "Find all pairs.", "solution": ["..."],
             "final_answer": ["$(1,8,19), (2,7,13)$"], "context": None, "image_1": None,
             "is_multiple_answer": True, "unit": None, "answer_type": "Tuple", "subfield": "Number Theory"},
            {"id": 1700, "question": "In the figure <img_3408> find x.", "solution": ["..."],
             "final_answer": ["$5$"], "context": None, "image_1": "data:image/png;base64,AAA",
             "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "subfield": "Geometry"},
            {"id": 2000, "question": "Compute $T$.", "solution": ["..."], "final_answer": ["$\\frac{1}{2}$"],
             "context": None, "image_1": None, "is_multiple_answer": False, "unit": None,
             "answer_type": "Numerical", "subfield": "Algebra"}])],
        [("Find all pairs.", "(1,8,19), (2,7,13)", {"id": 1606, "is_multiple_answer": True}),
         ("Compute $T$.", "\\frac{1}{2}", {"id": 2000, "subfield": "Algebra"})]),
}
SOURCES = {"aime2024": "aime2024", "aime2025": "aime2025", "math500": "math500", "amc2023": "amc2023",
           "minerva": "minerva_math", "olympiadbench": "olympiadbench"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_math_benchmark_converts_row_by_row(tmp_path: Path, name: str) -> None:
    files, expected = CASES[name]
    inputs = [str(write_raw(tmp_path / f, recs, fmt)) for f, fmt, recs in files]
    out = tmp_path / "out" / f"{name}.parquet"
    done = run_cli("data", name, "--input", *inputs, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {len(expected)} {name} rows to {out}\n"), done.stdout
    assert "note: " in done.stdout  # a 1-3 problem file is not the public set's size
    rows = read_rows(out)
    assert len(rows) == len(expected)
    assert [p.index for p in load_problems([str(out)])] == list(range(len(rows)))  # what `megatron-rl eval` reads
    for i, (row, (problem, answer, extra)) in enumerate(zip(rows, expected)):
        assert row["prompt"] == user(problem)
        assert row["answer"] == answer
        assert row["data_source"] == SOURCES[name] and grader_kind(row["data_source"], "none") == "math"
        assert row["extra_info"]["index"] == i and extra.items() <= row["extra_info"].items()
    # the math grader accepts the reference answer written as a model would
    assert grade_math(f"... so the answer is $\\boxed{{{rows[0]['answer']}}}$.", rows[0]["answer"]).score == 1.0
    if name == "olympiadbench":
        assert "skipped 1 (problems with images)" in done.stdout


def test_public_set_size_gives_no_note(tmp_path: Path) -> None:
    recs = [{"question": f"Problem {i}.", "answer": str(i)} for i in range(30)]
    out = tmp_path / "aime25.parquet"
    done = run_cli("data", "aime2025", "--input", str(write_raw(tmp_path / "a.jsonl", recs, "jsonl")),
                   "--output", str(out))
    assert done.returncode == 0 and done.stdout == f"wrote 30 aime2025 rows to {out}\n", done.stderr


BAD = {  # name -> (raw text, what the one-paragraph error must say)
    "aime_not_integer": ("aime2024", '{"problem": "p", "answer": "1/2"}\n',
                         "line 1: answer '1/2' is not an integer from 0 to 999"),
    "no_problem_field": ("math500", '{"answer": "2"}\n{"prompt": "p", "answer": "2"}\n',
                         "line 1: none of the fields `problem`, `question`"),
    "bad_json": ("amc2023", '{"question": "q", "answer": 1}\n{"question": \n', "line 2: not valid JSON"),
    "minerva_no_box": ("minerva", '{"problem": "p", "solution": "no box here"}\n',
                       "no `answer` field and no \\boxed{} answer in `solution`"),
    "olympiad_proof": ("olympiadbench", '{"question": "Prove it.", "final_answer": []}\n',
                       "`final_answer` is an empty list (a proof problem?)"),
    "list_answer": ("aime2025", '[{"problem": "p", "answer": ["1"]}]', "item 0 (0-based): field `answer` is a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_math_input_is_one_paragraph(tmp_path: Path, case: str) -> None:
    name, text, what = BAD[case]
    src = tmp_path / "raw.jsonl"
    src.write_text(text)
    out = tmp_path / "out.parquet"
    done = run_cli("data", name, "--input", str(src), "--output", str(out))
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"megatron-rl data: error: {src}, ") and what in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert sorted(tmp_path.iterdir()) == [src]  # no output, no temporary file left


def test_missing_input_and_empty_result(tmp_path: Path) -> None:
    done = run_cli("data", "math500", "--input", str(tmp_path / "gone.jsonl"), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "gone.jsonl: no such file" in done.stderr
    only_images = write_raw(tmp_path / "mm.jsonl", [{"question": "See <img_1>.", "final_answer": ["$1$"]}], "jsonl")
    done = run_cli("data", "olympiadbench", "--input", str(only_images), "--output", str(tmp_path / "o.parquet"))
    assert done.returncode == 2 and "no OlympiadBench (OE_TO_maths_en_COMP) problems found; skipped: 1 problems " \
                                    "with images" in done.stderr, done.stderr
    assert not (tmp_path / "o.parquet").exists()


def test_raw_reader_takes_every_published_form(tmp_path: Path) -> None:
    import gzip

    from megatron_rl.data.raw import read_records
    from megatron_rl.errors import DataError

    recs = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]
    files = {"list.json": json.dumps(recs).encode(), "lines.jsonl": "".join(json.dumps(r) + "\n" for r in recs).encode()}
    for name, data in list(files.items()):
        (tmp_path / name).write_bytes(data)
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress(data))
    write_raw(tmp_path / "table.parquet", recs, "parquet")
    for path in sorted(tmp_path.iterdir()):
        assert [r for _, r in read_records(str(path))] == recs, path
    assert [loc for loc, _ in read_records(str(tmp_path / "table.parquet"))] == ["row 0 (0-based)", "row 1 (0-based)"]
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(files["lines.jsonl"])[:-12])
    (tmp_path / "latin1.jsonl").write_bytes('{"problem": "caf\xe9"}\n'.encode("latin-1"))
    for bad, what in (("cut.jsonl.gz", "cannot be read"), ("latin1.jsonl", "not UTF-8 text"), (".", "is a directory")):
        with pytest.raises(DataError, match=what):
            list(read_records(str(tmp_path / bad)))
