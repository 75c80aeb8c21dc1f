"""megatron-rl: RL post-training of LLMs on megatron-core actors and SGLang rollouts.

The top-level ``kernels/`` folder is installed as ``megatron_rl.kernels`` (the bare name
``kernels`` belongs to another PyPI package and must never be installed by us).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _reqs(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


_core = [r for r in _reqs("requirements-cpu.txt") if not r.startswith("torch")]
_pkgs = find_packages(include=["megatron_rl", "megatron_rl.*"])
_kernel_pkgs = ["megatron_rl.kernels"] + [
    "megatron_rl.kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="megatron-rl",
    version="0.1.0",
    description="Reinforcement-learning post-training of LLMs on megatron-core and SGLang",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=_pkgs + _kernel_pkgs,
    package_dir={"megatron_rl.kernels": "kernels"},
    package_data={"megatron_rl": ["py.typed", "data/templates/*.jinja"]},
    # torch itself is declared loosely: the CPU path pins 2.13.0 (requirements-cpu.txt),
    # GPU clusters bring their own CUDA build (NGC containers).
    install_requires=["torch>=2.6"] + _core,
    extras_require={
        "sglang": ["sglang>=0.5.4"],
        "te": ["transformer-engine[pytorch]>=2.4"],
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],
        "wandb": ["wandb>=0.31"],
        "triton": ["triton>=3.3"],
        "dev": _reqs("requirements-dev.txt"),
    },
    entry_points={"console_scripts": ["megatron-rl=megatron_rl.cli.main:main"]},
)
