"""The sampler, graders and report with a scripted backend: known responses, hand-computed table,
resume after an interruption, traces for SFT. Real graders (math worker, code sandbox)."""

from __future__ import annotations

import asyncio
import json

import pytest

from megatron_rl.data.synthetic import write_parquet
from megatron_rl.errors import DataError, UserError
from megatron_rl.eval.backends import Completion
from megatron_rl.eval.problems import load_problems
from megatron_rl.eval.records import SampleStore, check_settings
from megatron_rl.eval.report import compute_results, markdown
from megatron_rl.eval.sampling import SamplingJob, sample_all
from megatron_rl.eval.traces import trace_rows, write_traces
from megatron_rl.rewards import RewardPool

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
SUB = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"
# problem (dataset, index) -> the n responses, sample by sample
SCRIPT = {
    ("algebra", 0): [r"\boxed{4}", r"\boxed{5}", r"\boxed{5}", r"\boxed{4}"],  # tie 4/5: first (4) right
    ("algebra", 1): [r"\boxed{1}", r"\boxed{7}", "no answer", r"\boxed{7}"],  # majority 7 wrong
    ("coding", 0): [ADD, SUB, SUB, "no code"],
}


class Scripted:
    """A backend answering from SCRIPT; the sample index is recovered from the seed."""

    def __init__(self, seeds: dict[int, int], store: SampleStore, fail_after: int | None = None):
        self.seeds, self.store, self.fail_after, self.calls = seeds, store, fail_after, 0

    async def complete(self, problem, seed):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            while len(self.store.records) < self.fail_after:  # "die" once the first ones are written
                await asyncio.sleep(0.01)
            raise RuntimeError("killed")
        text = SCRIPT[(problem.dataset, problem.index)][self.seeds[seed]]
        return Completion(text, len(text), "length" if text == "no answer" else "stop")

    async def close(self):
        pass


@pytest.fixture
def data(tmp_path):
    write_parquet(tmp_path / "algebra.parquet", [
        {"prompt": "2+2?", "answer": "4", "data_source": "math"},
        {"prompt": "3+3?", "answer": "6", "data_source": "math"}])
    tests = json.dumps({"inputs": ["5 3\n"], "outputs": ["8\n"]})
    write_parquet(tmp_path / "coding.parquet", [{"prompt": "add two ints", "answer": tests, "data_source": "kodcode"}])
    return [str(tmp_path / "algebra.parquet"), str(tmp_path / "coding.parquet")]


def _seeds(job: SamplingJob) -> dict[int, int]:
    from megatron_rl.trainer.generate import sample_seed

    return {sample_seed(job.seed, 0, 0, p, i): i for p in range(2) for i in range(4)}


def _run(problems, path, job, fail_after=None):
    store = SampleStore(path)
    try:
        with RewardPool(1) as pool:
            asyncio.run(sample_all(Scripted(_seeds(job), store, fail_after), pool, store, problems, job))
    finally:
        store.close()
    return store


def test_table_by_hand_then_resume_gives_the_same(data, tmp_path):
    problems = load_problems(data)
    job = SamplingJob("m", n=4, seed=3)
    full = _run(problems, tmp_path / "full.jsonl", job)
    res = compute_results(full.records, ["m"], problems, 4)["m"]
    alg, code = res["algebra"], res["coding"]
    assert alg["avg"]["mean"] == pytest.approx((2 / 4 + 0 / 4) / 2)
    assert alg["pass_at"] == pytest.approx({"1": 0.25, "2": (1 - 1 / 6) / 2, "4": 0.5})
    assert alg["maj"] == 0.5  # tie on problem 0 -> first answer (4, right); problem 1 -> 7 (wrong)
    assert alg["truncated"] == pytest.approx(1 / 8)
    assert code["avg"]["mean"] == 0.25 and code["maj"] is None and code["pass_at"]["4"] == 1.0
    grades = {r.key[1:]: r.grade for r in full.records.values()}
    assert grades[("coding", 0, 0)] == "correct" and grades[("coding", 0, 3)].startswith("no_code")
    table = markdown(compute_results(full.records, ["m"], problems, 4), 4)
    assert "| m | 2 | 25.0 (0.0-74.0) | 25.0 | 41.7 | 50.0 | 50.0 |" in table, table

    # interrupted after 5 samples, with a torn last line, then resumed: same records, same table
    part = tmp_path / "part.jsonl"
    with pytest.raises(RuntimeError, match="killed"):
        _run(problems, part, job, fail_after=5)
    kept = part.read_text().splitlines()
    assert len(kept) == 5
    part.write_text("\n".join(kept) + "\n" + kept[-1][:20])
    again = _run(problems, part, job)
    assert {k: v for k, v in again.records.items()} == full.records
    assert compute_results(again.records, ["m"], problems, 4) == compute_results(full.records, ["m"], problems, 4)
    assert len(part.read_text().splitlines()) == 12


def test_traces_keep_correct_and_all(data, tmp_path):
    problems = load_problems(data)
    store = _run(problems, tmp_path / "s.jsonl", SamplingJob("m", n=4, seed=3))
    rows = trace_rows(store.records, problems, "m", 4, "correct")
    assert [(r["dataset"], r["problem"], r["sample"]) for r in rows] == [
        ("algebra", 0, 0), ("algebra", 0, 3), ("coding", 0, 0)]
    assert rows[0]["messages"] == [{"role": "user", "content": "2+2?"},
                                   {"role": "assistant", "content": r"\boxed{4}"}]
    assert len(trace_rows(store.records, problems, "m", 4, "all")) == 12
    write_traces(tmp_path / "t.parquet", rows)
    from megatron_rl.data.parquet import ParquetSource
    from megatron_rl.data.schema import Where, decode_messages

    src = ParquetSource([str(tmp_path / "t.parquet")], required=["messages"])
    first = next(src.row_groups()).rows[0]["messages"]
    assert decode_messages(first, Where("t", 0, "messages"))[1]["content"] == r"\boxed{4}"


def test_bad_inputs_have_clear_errors(data, tmp_path):
    with pytest.raises(DataError, match="named 'algebra'"):
        load_problems([data[0], data[0]])
    write_parquet(tmp_path / "bad.parquet", [{"prompt": "x", "answer": "", "data_source": "math"}])
    with pytest.raises(DataError, match="row 0.*`answer`"):
        load_problems([str(tmp_path / "bad.parquet")])
    check_settings(tmp_path / "run.json", {"n": 4, "seed": 0})
    check_settings(tmp_path / "run.json", {"n": 4, "seed": 0})
    with pytest.raises(UserError, match="n: 4 then, 8 now"):
        check_settings(tmp_path / "run.json", {"n": 8, "seed": 0})
    (tmp_path / "junk.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="line 1: not a sample record"):
        SampleStore(tmp_path / "junk.jsonl")
