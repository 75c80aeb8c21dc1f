"""Parallel section: tensor/pipeline/context/sequence/data parallel sizes and micro-batching."""

from dataclasses import dataclass

from megatron_rl.config.base import require
from megatron_rl.errors import ConfigError


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size: splits heads and the MLP/vocabulary across ranks."""
    pp: int = 1
    """Pipeline-parallel size: splits layers into stages (1F1B schedule)."""
    cp: int = 1
    """Context-parallel size: splits each sequence (load-balanced 2*cp chunks) across ranks."""
    dp: int = 1
    """Data-parallel size. The trainer world is tp*pp*cp*dp processes: `megatron-rl train` starts
    that many locally, and under torchrun/srun the launched world must be exactly that size."""
    sp: bool = False
    """Sequence parallelism inside each TP group (needs tp > 1); saves activation memory."""
    num_microbatches: int = 1
    """Micro-batches per optimizer step on each data-parallel rank (pipeline depth when pp > 1)."""
    distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (Megatron distributed optimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient all-reduce with the backward pass (GPU runs)."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "dp", "num_microbatches"):
            require(getattr(self, name) >= 1, f"`parallel.{name}` must be >= 1, got {getattr(self, name)}.")
        require(not self.sp or self.tp > 1,
                "`parallel.sp=true` (sequence parallel) needs `parallel.tp` > 1; set sp=false or raise tp.")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    @property
    def world_size(self) -> int:
        """Processes of the trainer world (tp * pp * cp * dp)."""
        return self.model_parallel_size * self.dp


def check_layout(
    par: ParallelConfig,
    world_size: int,
    *,
    num_heads: int | None = None,
    num_kv_heads: int | None = None,
    num_layers: int | None = None,
    seq_len: int | None = None,
) -> int:
    """Refuse impossible layouts before any heavy initialisation; returns the DP size.

    Each failure says what to change. Model dimensions are optional so the check can run
    before the model's config is read (world size only) and again after.
    """
    mp = par.model_parallel_size
    problems: list[str] = []
    if world_size % mp:
        problems.append(
            f"the world size {world_size} is not divisible by tp*pp*cp = "
            f"{par.tp}*{par.pp}*{par.cp} = {mp}: launch a multiple of {mp} processes or change the sizes"
        )
    if num_heads is not None and num_heads % par.tp:
        problems.append(f"{num_heads} attention heads do not split over tp={par.tp}: pick a tp dividing {num_heads}")
    if num_kv_heads is not None and num_kv_heads % par.tp:
        problems.append(
            f"{num_kv_heads} key/value heads (GQA groups) do not split over tp={par.tp}: "
            f"pick a tp dividing {num_kv_heads}"
        )
    if num_layers is not None and num_layers % par.pp:
        problems.append(f"{num_layers} layers do not split into pp={par.pp} equal stages: pick a pp dividing {num_layers}")
    if seq_len is not None and par.cp > 1 and seq_len % (2 * par.cp):
        problems.append(
            f"sequence length {seq_len} is not divisible by 2*cp = {2 * par.cp} (context parallel "
            f"splits each sequence into 2*cp chunks): pad sequences to a multiple of {2 * par.cp}"
        )
    if seq_len is not None and par.sp and seq_len % par.tp:
        problems.append(
            f"sequence length {seq_len} is not divisible by tp={par.tp}, which sequence parallel needs: "
            f"pad to a multiple of {par.tp}"
        )
    if par.pp > 1 and par.num_microbatches < par.pp:
        problems.append(
            f"num_microbatches={par.num_microbatches} is below pp={par.pp}, leaving pipeline stages idle: "
            f"use at least {par.pp} micro-batches"
        )
    if problems:
        raise ConfigError("Impossible parallel layout: " + "; ".join(problems) + ".")
    return world_size // mp
