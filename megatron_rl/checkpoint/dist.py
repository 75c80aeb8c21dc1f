"""The one adapter in front of ``megatron.core.dist_checkpointing`` (torch_dist format).

What it adds to megatron's save/load:
- a shape and key check of the model against the checkpoint's metadata *before* reading any
  tensor, so a checkpoint of another model is refused with the tensor name and both shapes;
- every failure of megatron or torch.distributed.checkpoint turned into a one-paragraph
  ``CheckpointError`` instead of a multi-rank traceback;
- ``read_layer``: reading one layer's slice of the stacked ``decoder.layers.*`` tensors,
  which is how ``mcore-to-hf`` streams a model of any size in a single process.

Saving starts megatron's filesystem writer, which forks writer processes and creates one
spawn-mode ``multiprocessing.Manager`` per process: a script that saves must keep its body
under ``if __name__ == "__main__":`` (the spawned child re-imports the main module).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from megatron_rl.errors import CheckpointError

_LAYERS = "decoder.layers."


def _short(e: BaseException, limit: int = 300) -> str:
    """The root cause in one line: torch DCP wraps each rank's failure with its traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(e, CheckpointException) and e.failures:
        first = next(iter(e.failures.values()))
        return _short(first[0] if isinstance(first, tuple) else first, limit)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 150 and ". " in first:  # e.g. torch.load's advice on weights_only: not ours
        first = first.split(". ")[0] + "."
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    text = text.rstrip(".")
    return text if len(text) <= limit else text[:limit] + " ..."


def _failures() -> tuple[type[BaseException], ...]:
    # torch DCP's CheckpointException derives from BaseException, not Exception.
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


@contextlib.contextmanager
def _quiet():
    # megatron 0.16 calls torch DCP's deprecated `load_state_dict`: one FutureWarning per load.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="megatron.core.dist_checkpointing")
        yield


def save(sharded_state_dict: dict, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict, str(directory))


def tensors_metadata(directory: Path, what: str) -> dict[str, Any]:
    """Checkpoint key -> ShardedTensor (global shape, dtype) of a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    if not (directory / "metadata.json").is_file() or not (directory / ".metadata").is_file():
        raise CheckpointError(
            f"`{directory}` holds no {what} (megatron `metadata.json` / `.metadata` missing): the "
            "checkpoint is incomplete or was written without it."
        )
    try:
        return dist_checkpointing.load_tensors_metadata(str(directory))
    except _failures() as e:  # megatron and torch DCP raise many types for a damaged file
        raise CheckpointError(f"The {what} metadata in `{directory}` cannot be read "
                              f"({_short(e)}); the checkpoint is damaged, use an earlier one.") from None


def _expected_tensors(sharded_state_dict: dict) -> list:
    """The ShardedTensors a load will request (factories applied on a throwaway copy)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = []
    for v in nested_values(sharded_state_dict):
        if isinstance(v, ShardedTensorFactory):
            built = v.build()
            out += [b for b in nested_values(built) if isinstance(b, ShardedTensor)]
        elif isinstance(v, ShardedTensor):
            out.append(v)
    return out


def check_against(sharded_state_dict: dict, metadata: dict[str, Any], directory: Path, what: str,
                  hint: str = "") -> None:
    """Refuse a checkpoint that lacks a tensor the model needs or stores it with another shape."""
    for sh in _expected_tensors(sharded_state_dict):
        stored = metadata.get(sh.key)
        if stored is None:
            raise CheckpointError(
                f"The {what} in `{directory}` has no tensor `{sh.key}`, which this model needs: the "
                f"checkpoint belongs to a different model or configuration.{hint}")
        if tuple(stored.global_shape) != tuple(sh.global_shape) and not sh.allow_shape_mismatch:
            raise CheckpointError(
                f"The {what} in `{directory}` stores `{sh.key}` with shape "
                f"{tuple(stored.global_shape)} but this model's is {tuple(sh.global_shape)}: the "
                f"checkpoint belongs to a model of other dimensions.{hint}")


def raise_if_any(error: str | None) -> None:
    """Collective: raise ``CheckpointError`` on every rank if any rank has an error message.

    A check that fails on one rank only (a key one pipeline stage holds) must not leave the
    other ranks waiting in the next collective until the process-group timeout.
    """
    import torch.distributed as tdist

    errors = [error]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        errors = [None] * tdist.get_world_size()
        tdist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise CheckpointError(first)


def load(sharded_state_dict: dict, directory: Path, what: str, hint: str = "") -> dict:
    """Load ``sharded_state_dict`` from a torch_dist checkpoint, checked and with user errors."""
    from megatron.core import dist_checkpointing

    error = None
    try:
        check_against(sharded_state_dict, tensors_metadata(directory, what), directory, what, hint)
    except CheckpointError as e:
        error = str(e)
    raise_if_any(error)  # pipeline stages check different tensors: all fail, or none enters the load
    try:
        with _quiet():
            return dist_checkpointing.load(sharded_state_dict, str(directory))
    except CheckpointError:
        raise
    except _failures() as e:
        raise CheckpointError(f"Loading the {what} from `{directory}` failed: {_short(e)}. The "
                              f"checkpoint is damaged or does not match the model.{hint}") from None


# ----------------------------------------------------------------- layer-wise reading


def layer_keys(metadata: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(stacked per-layer keys, global keys) among the checkpoint's tensors."""
    layered = sorted(k for k in metadata if k.startswith(_LAYERS))
    return layered, sorted(k for k in metadata if not k.startswith(_LAYERS))


def read_tensors(directory: Path, metadata: dict[str, Any], keys: list[str],
                 layer: int | None = None) -> dict[str, torch.Tensor]:
    """Read whole global tensors (``layer=None``) or layer ``layer`` of stacked ones.

    megatron stores homogeneous layers stacked: ``decoder.layers.<rest>`` has global shape
    ``[num_layers, ...]`` in the TP=1 layout, whatever layout saved it.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for key in keys:
        meta = metadata[key]
        shape = tuple(meta.global_shape)
        if layer is None:
            data = torch.empty(shape, dtype=meta.dtype)
            request[key] = ShardedTensor.from_rank_offsets(key, data, replica_id=0)
        else:
            # A [1, ...] slice rather than `prepend_axis_num=1`: megatron's older code path for
            # prepended axes cannot describe the other slices' owner in a world of one process.
            data = torch.empty((1, *shape[1:]), dtype=meta.dtype)
            request[key] = ShardedTensor.from_rank_offsets(key, data, (0, layer, shape[0]), replica_id=0)
    try:
        with _quiet():
            loaded = dist_checkpointing.load(request, str(directory), validate_access_integrity=False)
    except _failures() as e:
        raise CheckpointError(f"Reading {keys[0]} (and {len(keys) - 1} more) from `{directory}` "
                              f"failed: {_short(e)}. The checkpoint is damaged.") from None
    return {k: loaded[k] if layer is None else loaded[k][0] for k in keys}
