"""Small collective helpers: rank 0 does something, every rank learns the outcome."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from megatron_rl.errors import UserError


class RemoteUserError(UserError):
    """A user error raised on rank 0, re-raised on the other ranks with the same message."""


def broadcast(obj: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0; its result, or its ``UserError``, reaches every rank.

    A user error (bad data, a server that will not start) must stop every rank at once:
    left on rank 0 alone, the others would wait in the next collective until it times out.
    Other exceptions are bugs: rank 0 keeps the traceback, the others stop with a summary.
    """
    result, error, original = None, None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error, original = ("user", str(e), type(e).__name__), e
        except BaseException as e:  # noqa: BLE001 - shared, then re-raised below
            error, original = ("bug", f"{type(e).__name__}: {e}", type(e).__name__), e
    result, error = broadcast((result, error))
    if error is None:
        return result
    if original is not None:
        raise original
    if error[0] == "user":
        raise RemoteUserError(error[1])
    raise RuntimeError(f"rank 0 failed: {error[1]}")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop signal seen by one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
