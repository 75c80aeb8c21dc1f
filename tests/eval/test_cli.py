"""`megatron-rl eval` and `generate` as users type them: a tiny model on a generated math set and
code set, 2 embedded servers, killed mid-run and resumed; a checkpoint as --model; traces from an
OpenAI-compatible server trained through `megatron-rl sft`."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import free_port
from tests.trainer.conftest import sections
from tests.trainer.helpers import kill_tree, metrics, one_paragraph, run, start, write_recipe

N, TOKENS = 8, 40
COMMON = ["--n", N, "--max-new-tokens", TOKENS, "--temperature", 1.0, "--top-p", 0.95]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A tiny model, 8 held-out addition problems, 3 code problems (stdin, call, assert tests)."""
    from megatron_rl.data.synthetic import write_arithmetic_parquet, write_parquet
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("bench")
    tok = build_tokenizer(root / "hf")
    build_model(root / "hf", tok, seed=0, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
    write_arithmetic_parquet(root / "add.parquet", 8, seed=2, split="heldout")
    write_parquet(root / "code.parquet", [
        {"prompt": "a+b io", "data_source": "kodcode",
         "answer": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})},
        {"prompt": "f(x)=x", "data_source": "kodcode",
         "answer": json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [1]})},
        {"prompt": "g()=1", "data_source": "humaneval",
         "answer": json.dumps({"test_code": "assert g() == 1"})}])
    return root


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_eval_killed_and_resumed_gives_the_table_of_an_uninterrupted_run(bench, tmp_path):
    data = ["--data", bench / "add.parquet", bench / "code.parquet"]
    total = (8 + 3) * N
    ckpt = tmp_path / "ckpt"  # the same weights as a megatron-rl checkpoint: exported, then evaluated
    assert run(["convert", "hf-to-mcore", "--hf", bench / "hf", "--out", ckpt]).returncode == 0
    ref = run(["eval", "--model", bench / "hf", "--model", ckpt, *data, *COMMON, "--servers", 2,
               "--out", tmp_path / "ref"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _lines(tmp_path / "ref" / "samples.jsonl") == 2 * total
    results = json.loads((tmp_path / "ref" / "results.json").read_text())["results"]
    assert results[str(bench / "hf")] == results[str(ckpt)]  # bit-exact export, same seeds, same samples
    assert (tmp_path / "ref" / "models").is_dir()
    md = (tmp_path / "ref" / "results.md").read_text()
    assert "## add" in md and "## code" in md and f"maj@{N}" in md and md in ref.stdout

    out = tmp_path / "resumed"
    samples = out / "samples.jsonl"
    job = start(["eval", "--model", bench / "hf", *data, *COMMON, "--servers", 2, "--out", out], tmp_path / "log")
    deadline = time.monotonic() + 120
    while _lines(samples) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_tree(job, signal.SIGKILL)
    written = _lines(samples)
    assert 3 <= written < total, (written, (tmp_path / "log").read_text()[-2000:])
    assert not (out / "results.json").exists()

    again = run(["eval", "--model", bench / "hf", *data, *COMMON, "--servers", 2, "--out", out])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{total - written} samples to generate ({written} already in" in again.stderr
    resumed = json.loads((out / "results.json").read_text())["results"]
    assert resumed[str(bench / "hf")] == results[str(bench / "hf")]
    ref_rows = {ln for ln in (tmp_path / "ref" / "samples.jsonl").read_text().splitlines()
                if json.loads(ln)["model"] == str(bench / "hf")}
    assert set(samples.read_text().splitlines()) == ref_rows

    changed = run(["eval", "--model", bench / "hf", *data, "--n", 4, "--out", out])
    assert changed.returncode == 2 and "n: 8 then, 4 now" in one_paragraph(changed.stderr)


def test_eval_bad_input_is_one_paragraph(bench, tmp_path, capsys):
    from megatron_rl.cli.main import main

    base = ["eval", "--model", str(bench / "hf"), "--data", str(bench / "add.parquet"), "--out", str(tmp_path / "o")]
    for args, text in [(["--n", "0"], "--n must be >= 1"),
                       (["--top-p", "0"], "--top-p must be in (0, 1]"),
                       (["--server-urls", "localhost:1"], "full URLs"),
                       (["--model", str(tmp_path / "nope*")], "matches no file"),
                       (["--server-urls", "http://127.0.0.1:1", "--model", str(tmp_path)], "serve one model"),
                       (["--data", str(bench / "add.parquet"), str(bench / "add.parquet")], "named 'add'")]:
        assert main([*base, *args]) == 2, args
        assert text in one_paragraph(capsys.readouterr().err), args
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(bench / "add.parquet"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in one_paragraph(capsys.readouterr().err)
    assert main(["generate", *base[1:5], "--out", str(tmp_path / "t.txt")]) == 2
    assert "ending in .parquet" in one_paragraph(capsys.readouterr().err)


@pytest.mark.slow
def test_generate_from_an_openai_server_trains_through_sft(bench, tmp_path):
    from megatron_rl.rollout import servers as srv

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = srv.start_process([*srv.megatron_rl_command(sys.executable), "serve", "--model",
                                str(bench / "hf"), "--port", str(port), "--deterministic"],
                               url, tmp_path / "serve.log", {"CUDA_VISIBLE_DEVICES": ""})
    try:
        srv.wait_healthy([server], timeout_s=120, poll_s=0.2)
        traces = tmp_path / "traces.parquet"
        args = ["generate", "--model", "tiny", "--data", bench / "add.parquet", "--n", 2, "--max-new-tokens", 12,
                "--temperature", 1.0, "--server-urls", url, "--api", "openai", "--out", traces]
        none = run(args)  # a random model answers nothing right: nothing to keep
        assert none.returncode == 2 and "--keep all" in one_paragraph(none.stderr)
        proc = run([*args, "--keep", "all"])  # resumes from traces.samples.jsonl: no new requests
        assert proc.returncode == 0 and "wrote 16 of 16 samples (all)" in proc.stdout, proc.stderr[-2000:]
        assert "all 16 samples already in" in proc.stderr
    finally:
        srv.stop_process(server)
    sft_dir = tmp_path / "sft"
    sec = sections(bench, sft_dir, data={"train_files": [str(traces)]}, train={"num_steps": 2},
                   sft={"batch_size": 8, "max_len": 64}, model={"path": str(bench / "hf")})
    trained = run(["sft", write_recipe(tmp_path / "sft.yaml", **sec)])
    assert trained.returncode == 0, trained.stderr[-3000:]
    rows = metrics(sft_dir)
    assert len(rows) == 2 and rows[0]["sft/tokens"] > 0
