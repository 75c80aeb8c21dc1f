#!/usr/bin/env bash
# The GPU checks, one script for one short device lease (about 8 minutes on an H100/H200).
#
# CI has no GPU, so this is where the CUDA paths meet a real device: the compiled Triton
# kernels (their tests, then the benchmark beside the naive path and Liger-Kernel), the
# Megatron actor's log-probs on CUDA (NCCL, bf16, the fused output layer) against
# Hugging Face, and `megatron-rl sft` + `megatron-rl train` end to end with the actor on the
# GPU and an embedded rollout server. Each part has its own time limit and log, so one
# failure still leaves the others' figures.
#
# Needs: python3 with a CUDA torch and triton (NGC containers, the device image), and the
# wheels of what that image lacks in .whl/ (see docs/gpu_check.md for the download line).
# Usage:  OUT=/some/dir [PARTS="kernels e2e"] tools/gpu_check.sh      (logs, CSV and summary.txt land in $OUT)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# part NAME SECONDS CMD...: run CMD under a time limit, log to $OUT/NAME.log, one summary line.
# PARTS="kernels parity" runs only those (a rerun after a fix); default: all four.
part() {
  local name=$1 limit=$2 start rc
  shift 2
  [[ " ${PARTS:-kernels bench parity e2e} " == *" $name "* ]] || return 0
  start=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  note "== $name: rc=$rc in $(( $(date +%s) - start )) s (limit $limit s)"
  tail -n 25 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

note "== $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"

# Install what the image lacks, then the project itself (no index: the machine is offline).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl >>"$SUMMARY" 2>&1
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >>"$SUMMARY" 2>&1
BIN=$(python3 -c 'import sys, os; print(os.path.dirname(sys.executable))')
export PATH="$BIN:$PATH"
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import torch, triton, transformers, megatron.core
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
      f"megatron-core {megatron.core.__version__}, device {torch.cuda.get_device_name()}")
EOF
command -v megatron-rl >/dev/null || note "megatron-rl console script missing from $BIN"

# 1. Kernel tests, compiled (the conftest sets TRITON_INTERPRET only without CUDA).
part kernels 120 python3 -m pytest tests/kernels -q -p no:cacheprovider

# 2. Kernel benchmark: Qwen2-1.5B output layer at 8K and 32K tokens, bf16, vs naive and Liger.
part bench 100 python3 benchmarks/bench_linear_logprobs.py --tokens 8192 32768 \
  --csv "$OUT/bench_linear_logprobs_gpu.csv"

# 3. Actor log-probs on CUDA against Hugging Face (a random Qwen2-0.5B-shaped model).
part parity 80 python3 tools/gpu_check.py parity --dir runs/gpu_check_parity

# 4. The job: SFT warm-up then GRPO with the actor on the GPU and an embedded server.
part e2e 130 python3 tools/gpu_check.py e2e --dir runs/gpu_check_e2e
cp runs/gpu_check_e2e/rl/metrics.jsonl "$OUT/e2e_metrics.jsonl" 2>/dev/null || true
note "== done $(date -u +%FT%TZ)"
