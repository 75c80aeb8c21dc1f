# The two commands of the README: `make demo` (the main job on CPU) and `make test`.
# Each sets up .venv in the repository root first (idempotent; torch pinned to the CPU build).
PY := .venv/bin/python
PIP := .venv/bin/pip
STAMP := .venv/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): requirements-cpu.txt requirements-dev.txt setup.py
	test -x $(PY) || python3.11 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first and alone: with 2.13.0 present nothing later can pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-cpu.txt -r requirements-dev.txt
	# triton's wheel declares no CPU-usable deps; the interpreter (TRITON_INTERPRET=1) needs only numpy.
	$(PIP) install -q --no-deps triton==3.9.0
	$(PIP) install -q --no-deps -e .
	# The code grader's sandbox uses bubblewrap when present (best effort: it degrades, and says so).
	command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq bubblewrap) >/dev/null 2>&1; } || true
	# The launch tests start a one-node Slurm cluster (tests/launch/slurm; procps: pkill, which the
	# rendered sbatch script uses to forward the pre-emption signal): best effort as for bubblewrap;
	# without it they skip and say why.
	@for b in slurmctld slurmd sbatch munged pkill; do command -v $$b >/dev/null || [ -x /usr/sbin/$$b ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge procps) >/dev/null 2>&1 && \
	    echo "installed slurmctld slurmd slurm-client munge procps (apt)"; } || \
	  echo "note: Slurm/munge not installed (needs root and apt-get): the Slurm launch tests will skip"; fi
	$(PY) -c "import torch, megatron.core, megatron_rl.kernels; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

# Every test, the slow multi-process ones included (CI runs exactly this).
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=15

# Everything except tests marked slow: the inner loop while developing.
test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow" -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check megatron_rl kernels tests tools benchmarks

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .venv build *.egg-info
