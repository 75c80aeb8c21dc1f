"""Synthetic addition problems for the CPU demo: RL rows, held-out rows and an SFT warm-up set.

A problem is ``a+b`` (``a`` < ``max_a``, ``b`` < ``max_b``); the prompt is just ``"a+b"`` (every
character is a token of the demo tokenizer) and the graded answer is ``\\boxed{a+b}``.
``carry_frac`` is the share of problems whose ones digits carry; the rest never carry.

Train and held-out problems are disjoint by construction: a problem belongs to the
held-out split when a hash of its text falls in the first ``heldout_frac`` of the hash
range, whatever the seed or the sizes asked for.

The SFT set (``sft_rows``) is written by a sloppy teacher: on a carrying problem it forgets
the carry (answers ``a+b-10``) with probability ``forget_carry``. A model warmed up on it
learns the format and the no-carry sums, and, when ``forget_carry`` > 0.5, prefers the
wrong answer on carries (greedy accuracy about 1 - ``carry_frac``) while still sampling the
right one often enough for GRPO to find it. Whatever the demo gains over the warm-up on
carrying problems is then the grader's doing, through RL.

Row schema (RL and held-out): ``prompt`` = ``[{"role": "user", "content": "a+b"}]``,
``answer`` = ``"a+b"`` as a decimal string, ``data_source`` = ``"arithmetic"``,
``extra_info`` = ``{"a": a, "b": b, "carry": bool, "index": i}``.
SFT schema: ``messages`` = user prompt + assistant ``\\boxed{...}``, ``answer`` = the true sum.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

DATA_SOURCE = "arithmetic"
SPLITS = ("train", "heldout")


def in_heldout(a: int, b: int, heldout_frac: float = 0.2) -> bool:
    """Whether ``a+b`` belongs to the held-out split (a hash split, independent of seeds)."""
    digest = hashlib.sha256(f"{a}+{b}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < heldout_frac * 2**64


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def _pool(split: str, max_a: int, max_b: int, heldout_frac: float) -> tuple[list, list]:
    """All (a, b) of ``split``, as (carrying, not carrying) lists."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_heldout = split == "heldout"
    carry, plain = [], []
    for a in range(max_a):
        for b in range(max_b):
            if in_heldout(a, b, heldout_frac) == want_heldout:
                (carry if carries(a, b) else plain).append((a, b))
    return carry, plain


def sample_problems(n: int, seed: int, *, split: str = "train", max_a: int = 100,
                    max_b: int = 100, carry_frac: float = 0.7, heldout_frac: float = 0.2,
                    unique: bool = False) -> list[tuple[int, int]]:
    """``n`` problems (a, b) of ``split``; about ``carry_frac`` of them carry.

    ``unique`` draws without replacement (for an evaluation set); a pool too small for that
    raises ValueError."""
    rng = random.Random(f"{seed}:{split}")
    carry, plain = _pool(split, max_a, max_b, heldout_frac)
    if unique:
        n_carry = round(n * carry_frac)
        if n_carry > len(carry) or n - n_carry > len(plain):
            raise ValueError(f"{split} has {len(carry)} carrying and {len(plain)} other "
                             f"problems, cannot draw {n} unique ones")
        out = rng.sample(carry, n_carry) + rng.sample(plain, n - n_carry)
        rng.shuffle(out)
        return out
    return [rng.choice(carry if rng.random() < carry_frac else plain) for _ in range(n)]


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}"


def response_text(answer: int) -> str:
    """The target response format, graded 1.0 by ``rewards.math.compute_score``."""
    return f"\\boxed{{{answer}}}"


def arithmetic_rows(n: int, seed: int, *, split: str = "train", max_a: int = 100,
                    max_b: int = 100, carry_frac: float = 0.7, heldout_frac: float = 0.2,
                    unique: bool | None = None) -> list[dict[str, Any]]:
    """RL / evaluation rows in the dataset schema (module docstring). Held-out rows are
    unique by default, train rows are drawn with replacement."""
    unique = split == "heldout" if unique is None else unique
    problems = sample_problems(n, seed, split=split, max_a=max_a, max_b=max_b,
                               carry_frac=carry_frac, heldout_frac=heldout_frac, unique=unique)
    return [{"prompt": [{"role": "user", "content": prompt_text(a, b)}],
             "answer": str(a + b), "data_source": DATA_SOURCE,
             "extra_info": {"a": a, "b": b, "carry": carries(a, b), "index": i}}
            for i, (a, b) in enumerate(problems)]


def sft_rows(n: int, seed: int, *, forget_carry: float = 0.6, max_a: int = 100,
             max_b: int = 100, carry_frac: float = 0.7,
             heldout_frac: float = 0.2) -> list[dict[str, Any]]:
    """Warm-up chat transcripts on train problems from the sloppy teacher (module doc)."""
    rng = random.Random(f"{seed}:sft")
    problems = sample_problems(n, seed + 7919, split="train", max_a=max_a, max_b=max_b,
                               carry_frac=carry_frac, heldout_frac=heldout_frac)
    rows = []
    for a, b in problems:
        said = a + b - 10 if carries(a, b) and rng.random() < forget_carry else a + b
        rows.append({"messages": [{"role": "user", "content": prompt_text(a, b)},
                                  {"role": "assistant", "content": response_text(said)}],
                     "answer": str(a + b)})
    return rows


def write_parquet(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_arithmetic_parquet(path: str | Path, n: int, seed: int, **kw: Any) -> Path:
    """``arithmetic_rows(n, seed, **kw)`` as a parquet file at ``path``."""
    return write_parquet(path, arithmetic_rows(n, seed, **kw))


def write_sft_parquet(path: str | Path, n: int, seed: int, **kw: Any) -> Path:
    """``sft_rows(n, seed, **kw)`` as a parquet file at ``path``."""
    return write_parquet(path, sft_rows(n, seed, **kw))
