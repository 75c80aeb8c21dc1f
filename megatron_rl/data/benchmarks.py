"""Evaluation benchmarks, from the files users download, to the training parquet schema.

``megatron-rl data NAME --input FILE... --output OUT.parquet`` reads each input
(``data.raw``: JSON, JSONL, gzip, parquet), turns every record into a row
(``data.math_benchmarks``, ``data.code_benchmarks``) and writes them atomically
(``data.writer``). Nothing is downloaded. Each row's ``data_source`` is a name that
``trainer.generate.grader_kind`` maps to the right grader, and ``extra_info.index`` is its
0-based row. Records deliberately left out (outside a date window, needing images, tests the
grader cannot run) are counted by reason; a malformed record stops the conversion with a
one-paragraph error naming the file and the record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_rl.data.code_benchmarks import humanevalplus_row, kodcode_row, lcb_row
from megatron_rl.data.convert import Fail, located
from megatron_rl.data.lcb import lcb_input_files
from megatron_rl.data.math_benchmarks import MATH_SETS
from megatron_rl.data.options import Options, Skip
from megatron_rl.data.raw import read_records
from megatron_rl.data.writer import write_rows

RowFn = Callable[[Any, int, Fail, Options], "dict[str, Any] | Skip"]


@dataclass(frozen=True)
class Benchmark:
    """One convertible benchmark."""

    title: str
    """Its usual name, for messages."""
    row: RowFn
    """A record (with its 0-based output row and a ``Fail`` for its location) to a row or Skip."""
    reads: str
    """The public files it reads, for ``--help``."""
    problems: int | None = None
    """Problems in the public set, to flag a file of another size; None: it varies."""
    row_group_size: int = 1024
    """Rows per parquet row group (code rows carry tests, so fewer)."""


BENCHMARKS: dict[str, Benchmark] = {
    "aime2024": Benchmark("AIME 2024", MATH_SETS["aime2024"].row,
                          "HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024, DeepScaleR aime.json", 30),
    "aime2025": Benchmark("AIME 2025", MATH_SETS["aime2025"].row,
                          "opencompass/AIME2025 (both parts), yentinglin/aime_2025, math-ai/aime25", 30),
    "math500": Benchmark("MATH-500", MATH_SETS["math500"].row, "HuggingFaceH4/MATH-500 test.jsonl", 500),
    "amc2023": Benchmark("AMC 2023", MATH_SETS["amc2023"].row, "math-ai/amc23, DeepScaleR amc.json", 40),
    "minerva": Benchmark("Minerva Math", MATH_SETS["minerva"].row,
                         "Qwen2.5-Math minerva_math/test.jsonl, math-ai/minervamath", 272),
    "olympiadbench": Benchmark("OlympiadBench (OE_TO_maths_en_COMP)", MATH_SETS["olympiadbench"].row,
                               "Hothan/OlympiadBench OE_TO_maths_en_COMP, Qwen2.5-Math olympiadbench", 675),
    "livecodebench": Benchmark("LiveCodeBench", lcb_row,
                               "livecodebench/code_generation_lite test*.jsonl (or its directory)",
                               row_group_size=32),
    "humanevalplus": Benchmark("HumanEval+", humanevalplus_row, "evalplus/humanevalplus", 164,
                               row_group_size=32),
    "kodcode": Benchmark("KodCode", kodcode_row, "KodCode/KodCode-V1, KodCode/KodCode-Light-RL-10K",
                         row_group_size=128),
}


@dataclass
class Report:
    """What a conversion did."""

    name: str
    rows: int
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self, out_path: str) -> str:
        """Lines for the command line: rows written, records skipped by reason, size check."""
        bench = BENCHMARKS[self.name]
        lines = [f"wrote {self.rows} {self.name} rows to {out_path}"]
        if self.skipped:
            lines.append("skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(self.skipped.items())))
        if bench.problems is not None and self.rows != bench.problems:
            lines.append(f"note: {bench.title} has {bench.problems} problems; these files gave {self.rows}")
        return "\n".join(lines)


def convert_benchmark(name: str, inputs: Sequence[str], out_path: str,
                      options: Options | None = None, row_group_size: int | None = None) -> Report:
    """Convert the raw files ``inputs`` of benchmark ``name`` (a key of BENCHMARKS) to ``out_path``."""
    bench = BENCHMARKS[name]
    options = options or Options()
    files = list(inputs)
    if name == "livecodebench":
        files = lcb_input_files(files, options.release_version)
    report = Report(name, 0)

    def rows() -> Iterator[dict[str, Any]]:
        for path in files:
            for loc, rec in read_records(path):
                row = bench.row(rec, report.rows, located(path, loc), options)
                if isinstance(row, Skip):
                    report.skipped[row.reason] += 1
                    continue
                report.rows += 1
                yield row

    def nothing() -> str:
        why = "; skipped: " + ", ".join(f"{n} {r}" for r, n in report.skipped.items())
        why = why if report.skipped else ""
        return (f"{', '.join(files)}: no {bench.title} problems found{why}, so nothing was written. "
                "Check that these are the benchmark's files and, for date windows, the dates.")

    report.rows = write_rows(rows(), out_path, row_group_size or bench.row_group_size, nothing)
    return report
