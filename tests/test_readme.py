"""Every command the README shows, run as written (placeholders such as HF_DIR filled in).

`README_COMMANDS` maps each command line of the README's bash blocks to how it is checked;
`test_every_readme_command_has_a_check` fails when the README gains a command nobody runs.
The commands run through the console script on PATH, in a scratch directory that holds
`configs/` and the `runs/demo/` files `make demo` would have written (a random tiny model in
place of the trained one: the commands are checked, not the learning).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



def _same(line: str, expect: str) -> dict[str, tuple[str, int, str]]:
    """A README line that runs exactly as written."""
    return {line: (line, 0, expect)}


# README line -> (what to run instead of placeholders, expected exit status, text the output must hold).
# "self": the line runs the suite itself or is run by another test named in the text.
README_COMMANDS: dict[str, tuple[str, int, str]] = {
    "make demo": ("self", 0, "tests/test_demo.py runs it"),
    "make test": ("self", 0, "CI runs it (.ci/run)"),
    "megatron-rl serve --model HF_DIR --host 127.0.0.1 --port 30000":
        ("self", 0, "tests/rollout/test_serve_cli.py runs it"),
    "megatron-rl train configs/tiny_cpu.yaml train.num_steps=2": (
        "megatron-rl train configs/tiny_cpu.yaml train.num_steps=2", 0, "step 2/2"),
    "megatron-rl plot runs/tiny_cpu": ("megatron-rl plot runs/tiny_cpu", 0, "curves.png"),
    "megatron-rl sft configs/tiny_sft.yaml train.num_steps=2": (
        "megatron-rl sft configs/tiny_sft.yaml train.num_steps=2", 0, "step 2/2"),
    "torchrun --nproc-per-node 2 -m megatron_rl train configs/tiny_cpu.yaml parallel.tp=2 train.num_steps=2 "
    "logging.output_dir=runs/tiny_tp2 checkpoint.dir=runs/tiny_tp2/ckpt": (
        "torchrun --nproc-per-node 2 -m megatron_rl train configs/tiny_cpu.yaml parallel.tp=2 train.num_steps=2 "
        "logging.output_dir=runs/tiny_tp2 checkpoint.dir=runs/tiny_tp2/ckpt", 0, "step 2/2"),
    "megatron-rl data deepscaler deepscaler.json data/deepscaler/train.parquet": (
        "megatron-rl data deepscaler deepscaler.json data/deepscaler/train.parquet", 0, "wrote 2 deepscaler rows"),
    "megatron-rl data deepcoder deepcoder.jsonl data/deepcoder/train.parquet": (
        "megatron-rl data deepcoder deepcoder.jsonl data/deepcoder/train.parquet", 0, "wrote 1 deepcoder rows"),
    # benchmark converters: one or two problems each in the public layout (write_benchmark_raw)
    **_same("megatron-rl data aime2024 --input aime_2024.parquet --output data/eval/aime24.parquet",
            "wrote 1 aime2024 rows"),
    **_same("megatron-rl data aime2025 --input aime2025-I.jsonl aime2025-II.jsonl "
            "--output data/eval/aime25.parquet", "wrote 2 aime2025 rows"),
    **_same("megatron-rl data math500 --input MATH-500/test.jsonl --output data/eval/math500.parquet",
            "wrote 1 math500 rows"),
    **_same("megatron-rl data amc2023 --input amc23.jsonl --output data/eval/amc23.parquet",
            "wrote 1 amc2023 rows"),
    **_same("megatron-rl data minerva --input minerva_math/test.jsonl --output data/eval/minerva.parquet",
            "wrote 1 minerva rows"),
    **_same("megatron-rl data olympiadbench --input OE_TO_maths_en_COMP.parquet "
            "--output data/eval/olympiadbench.parquet", "wrote 1 olympiadbench rows"),
    **_same("megatron-rl data livecodebench --input code_generation_lite --release-version release_v5 "
            "--start-date 2024-08-01 --end-date 2025-02-01 --output data/eval/lcb.parquet",
            "wrote 2 livecodebench rows to data/eval/lcb.parquet\nskipped 3 (before --start-date)"),
    **_same("megatron-rl data humanevalplus --input humanevalplus.parquet "
            "--output data/eval/humanevalplus.parquet", "wrote 1 humanevalplus rows"),
    **_same("megatron-rl data kodcode --input KodCode-Light-RL-10K.parquet --output data/kodcode/train.parquet",
            "wrote 1 kodcode rows"),
    # eval / generate: the random tiny model stands in for the RL checkpoint `make demo` writes;
    # generate keeps every sample (a random model answers nothing right).
    "megatron-rl eval --model runs/demo/sft/hf --model runs/demo/rl/ckpt --data runs/demo/data/heldout.parquet "
    "--n 8 --max-new-tokens 8 --temperature 1.0 --top-p 1.0 --servers 2 --out runs/demo/eval": (
        "megatron-rl eval --model runs/demo/sft/hf --model runs/demo/model --data runs/demo/data/heldout.parquet "
        "--n 2 --max-new-tokens 8 --temperature 1.0 --top-p 1.0 --servers 2 --out runs/demo/eval", 0,
        "| runs/demo/model | 8 |"),
    "megatron-rl generate --model runs/demo/rl/ckpt --data runs/demo/data/train.parquet --n 4 "
    "--max-new-tokens 8 --out runs/demo/traces.parquet": (
        "megatron-rl generate --model runs/demo/model --data runs/demo/data/heldout.parquet --n 4 "
        "--max-new-tokens 8 --out runs/demo/traces.parquet --keep all", 0, "wrote 32 of 32 samples (all)"),
    "megatron-rl train configs/deepscaler_1.5b_8k.yaml": (
        "megatron-rl train configs/deepscaler_1.5b_8k.yaml", 2, "models/DeepSeek-R1-Distill-Qwen-1.5B does not exist"),
    "megatron-rl convert hf-to-mcore --hf HF_DIR --out CKPT --tp 2 --pp 2": (
        "megatron-rl convert hf-to-mcore --hf runs/demo/model --out ckpt --tp 2 --pp 2", 0, "wrote megatron checkpoint"),
    **_same("megatron-rl plan configs/deepcoder_14b_32k.yaml", "peak per GPU: 72.57 of 79.6 GiB -> FITS"),
    "megatron-rl convert mcore-to-hf --ckpt CKPT --out HF_DIR": (
        "megatron-rl convert mcore-to-hf --ckpt ckpt --out hf_back", 0, "wrote HF model"),
    # Run on a cluster: placements and scripts as dry runs; the runs themselves in tests/launch/
    **_same("megatron-rl launch configs/deepcoder_14b_16k.yaml --launcher torchrun --gpus-per-node 8 --dry-run",
            "--nproc-per-node=8 --master-addr=127.0.0.1 --master-port=29500 -m megatron_rl train "
            "configs/deepcoder_14b_16k.yaml 'rollout.gpu_ids=[0,1,2,3,4,5,6,7]'"),
    **_same("megatron-rl launch configs/deepcoder_14b_16k.yaml --launcher torchrun --gpus-per-node 8 --dry-run "
            "rollout.colocate=false parallel.tp=4 rollout.num_servers=2",
            "--nproc-per-node=4 --master-addr=127.0.0.1 --master-port=29500 -m megatron_rl train "
            "configs/deepcoder_14b_16k.yaml rollout.colocate=false parallel.tp=4 rollout.num_servers=2 "
            "'rollout.gpu_ids=[4,5,6,7]'"),
    **_same("megatron-rl launch configs/deepcoder_14b_32k.yaml --launcher slurm --nodes 4 --gpus-per-node 8 "
            "--partition PARTITION --account ACCOUNT --time 24:00:00 --dry-run",
            "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n#SBATCH --partition=PARTITION"),
    **_same("megatron-rl launch configs/deepcoder_14b_32k.yaml --launcher slurm --nodes 4 --gpus-per-node 8 --dry-run "
            "rollout.colocate=false parallel.dp=2 rollout.num_servers=8 rollout.mem_fraction=0.85",
            "#   3     rollout server 7 (sglang)  6,7   2        30003  0.85"),
    "megatron-rl launch configs/tiny_cpu.yaml --launcher torchrun --procs-per-node 2 parallel.tp=2 train.num_steps=2":
        ("self", 0, "tests/launch/test_launch_cli.py runs it on the tiny test model"),
    "megatron-rl launch configs/tiny_cpu.yaml --launcher nemo-run --procs-per-node 2 parallel.tp=2 train.num_steps=2":
        ("self", 0, "tests/launch/test_nemo_local.py runs it on the tiny test model"),
    **_same("megatron-rl launch --launcher slurm --array eval --checkpoints runs/demo/sft/hf runs/demo/rl/ckpt "
            "--data runs/demo/data/heldout.parquet --out runs/eval_array --eval-args '--n 8 --max-new-tokens 8' "
            "--dry-run", "#SBATCH --array=0-1"),
    **_same("megatron-rl launch configs/tiny_cpu.yaml --launcher slurm --array seeds --seeds 0 1 2 3 --out runs/seeds "
            "--dry-run train.num_steps=50", "#SBATCH --array=0-3"),
    "megatron-rl launch gather runs/eval_array": (
        "self", 0, "tests/launch/test_render.py gathers an array it ran; tests/launch/test_slurm_launch.py on Slurm"),
    "torchrun --nproc-per-node 4 -m megatron_rl logprobs --model HF_DIR_OR_CKPT "
    "--input in.jsonl --output out.jsonl --tp 2 --pp 2": (
        "torchrun --nproc-per-node 4 -m megatron_rl logprobs --model ckpt --input in.jsonl --output out.jsonl "
        "--tp 2 --pp 2", 0, ""),
}


def readme_commands() -> list[str]:
    """Command lines of the README's bash blocks (comments dropped, continuations joined)."""
    text = (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def test_every_readme_command_has_a_check():
    assert sorted(readme_commands()) == sorted(README_COMMANDS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from megatron_rl.data import synthetic
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    wd = tmp_path_factory.mktemp("readme")
    (wd / "configs").symlink_to(ROOT / "configs")
    demo = wd / "runs" / "demo"
    tok = build_tokenizer(demo / "model")
    build_model(demo / "model", tok, seed=0)
    shutil.copytree(demo / "model", demo / "sft" / "hf")
    (demo / "data").mkdir()
    synthetic.write_sft_parquet(demo / "data" / "sft.parquet", 256, seed=0)
    synthetic.write_arithmetic_parquet(demo / "data" / "train.parquet", 64, seed=1)
    synthetic.write_arithmetic_parquet(demo / "data" / "heldout.parquet", 8, seed=2, split="heldout")
    (wd / "deepscaler.json").write_text(json.dumps([{"problem": "What is 1+1?", "answer": "2"},
                                                   {"problem": "What is 2+3?", "answer": "5"}]))
    tests = json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})
    (wd / "deepcoder.jsonl").write_text(json.dumps({"problem": "Add two numbers.", "tests": tests}) + "\n")
    (wd / "in.jsonl").write_text(json.dumps({"input_ids": [5, 17, 30, 2, 9, 11]}) + "\n")
    write_benchmark_raw(wd)
    return wd


def write_benchmark_raw(wd: Path) -> None:
    """Tiny raw files, in each benchmark's public layout, where the README's `data` commands read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def jsonl(name: str, *records: dict) -> None:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    pq.write_table(pa.table({"id": [60], "problem": ["Find n."], "answer": ["204"]}), wd / "aime_2024.parquet")
    jsonl("aime2025-I.jsonl", {"question": "Find m.", "answer": "70"})
    jsonl("aime2025-II.jsonl", {"question": "Find k.", "answer": "0"})
    jsonl("MATH-500/test.jsonl", {"problem": "1+1?", "solution": "$\\boxed{2}$", "answer": "2", "subject": "Algebra",
                                  "level": 1, "unique_id": "test/algebra/1.json"})
    jsonl("amc23.jsonl", {"id": 0, "question": "How many?", "answer": 27.0, "url": "u"})
    jsonl("minerva_math/test.jsonl", {"problem": "Speed?", "solution": "$\\boxed{3}$ m/s", "type": "t", "idx": 0})
    pq.write_table(pa.table({"id": [1606], "question": ["Find x."], "final_answer": [["$5$"]]}),
                   wd / "OE_TO_maths_en_COMP.parquet")
    stdin = [{"input": "1 2\n", "output": "3\n", "testtype": "stdin"}]
    for i, date in enumerate(["2023-05-01", "2024-01-01", "2024-06-01", "2024-08-05", "2024-11-01"], start=1):
        jsonl(f"code_generation_lite/test{i if i > 1 else ''}.jsonl", {
            "question_title": "A", "question_content": "Add.", "platform": "atcoder", "question_id": f"abc{i}",
            "contest_id": "abc", "contest_date": f"{date}T00:00:00", "starter_code": "", "difficulty": "easy",
            "public_test_cases": json.dumps(stdin), "private_test_cases": "[]", "metadata": "{}"})
    test = "def check(candidate):\n    assert candidate(2) == 4\n"
    pq.write_table(pa.table({"task_id": ["HumanEval/0"], "prompt": ["def double(x):\n"], "entry_point": ["double"],
                             "canonical_solution": ["    return 2 * x\n"], "test": [test]}), wd / "humanevalplus.parquet")
    pq.write_table(pa.Table.from_pylist([{
        "question_id": "Leetcode_1", "question": "Write double(x).", "solution": "def double(x):\n    return 2 * x\n",
        "test": "from solution import double\n\ndef test_double():\n    assert double(2) == 4\n",
        "test_info": [{"function_name": "double", "function_declaration": "def double(x):"}]}]),
        wd / "KodCode-Light-RL-10K.parquet")


RUNNABLE = [k for k, v in README_COMMANDS.items() if v[0] != "self"]


@pytest.mark.slow
@pytest.mark.parametrize("line", RUNNABLE, ids=[k.split(" ")[0] + ":" + " ".join(k.split(" ")[1:3]) for k in RUNNABLE])
def test_readme_command_runs_as_written(workdir, line):
    command, status, expect = README_COMMANDS[line]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if "plot" in command and not (workdir / "runs" / "tiny_cpu" / "metrics.jsonl").exists():
        subprocess.run(README_COMMANDS["megatron-rl train configs/tiny_cpu.yaml train.num_steps=2"][0], shell=True,
                       cwd=workdir, env=env, timeout=600, capture_output=True)
    if "mcore-to-hf" in command or "logprobs" in command:
        if not (workdir / "ckpt").exists():
            subprocess.run(README_COMMANDS["megatron-rl convert hf-to-mcore --hf HF_DIR --out CKPT --tp 2 --pp 2"][0],
                           shell=True, cwd=workdir, env=env, timeout=600, check=True, capture_output=True)
        shutil.rmtree(workdir / "hf_back", ignore_errors=True)
    proc = subprocess.run(command, shell=True, cwd=workdir, env=env, timeout=900, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == status, out[-4000:]
    assert expect in out, out[-4000:]
    if status == 2:
        assert "Traceback" not in out
    if "logprobs" in command:
        assert len(json.loads((workdir / "out.jsonl").read_text())["logprobs"]) == 5
