"""The Megatron actor: log-probs and the train step over megatron-core's pipeline schedules.

The loss is the caller's: ``loss_fn(logp_BS, entropy_BS, mb) -> (loss, metrics)`` returns
this micro-batch's *share* of a step loss whose normaliser is global (tokens or sequences of
the whole step, across micro-batches and DP ranks; see ``megatron_rl.algos``). Megatron
averages the loss over micro-batches and gradients over DP replicas; the actor multiplies
by both counts so the gradient is exactly the sum of the shares, whatever the micro-batching.

Under context parallelism ``loss_fn`` still sees whole sequences: each CP rank gathers the
per-token log-probs of all ranks (``cp_gather``) and evaluates the same loss, and its
gradient flows back only into its own tokens.

A loss that is a sum of per-token terms can instead be given as a ``TokenSeparableLoss``:
the output-layer kernel then forms its gradients while each chunk's logits are at hand
(``linear_logprobs_loss``: 3 passes over the vocabulary instead of 4). That kernel is torch
only (fp32) for now, so on CUDA the actor trains the same loss through its ``metrics`` form
and the Triton ``linear_logprobs`` instead, until a Triton loss-in-forward exists and a GPU
benchmark shows it wins.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rl.actor.forward import (
    MicroBatch,
    cp_gather,
    output_weight,
    return_hidden_states,
    token_logprobs,
)
from megatron_rl.actor.model import unwrap_gpt
from megatron_rl.models.hf_config import ModelDims
from megatron_rl.parallel.cp_layout import check_cp_length, cp_slice
from megatron_rl.parallel.topology import Topology

LossFn = Callable[[Tensor, Tensor | None, MicroBatch], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class TokenSeparableLoss:
    """A step loss that is a sum of per-token terms, trained through the fused kernel.

    ``token_loss(mb)`` returns the micro-batch's per-token loss over its flattened
    ``[B * S]`` tokens (row ``b * S + t``), as ``megatron_rl.kernels.linear_logprobs_loss``
    takes it, except that ``rows`` may be an index tensor as well as a slice (under context
    parallelism a rank's tokens are not contiguous in the sequence). ``metrics`` is the same
    loss as a ``LossFn``: it runs on the detached log-probs and entropy of whole sequences,
    and its metrics (and loss value, as ``loss``) are what the step reports.
    ``megatron_rl.algos.build_token_loss`` builds the first for the token-level losses.
    """

    token_loss: Callable[[MicroBatch], Callable[[Tensor, Tensor, object], Tensor]]
    metrics: LossFn


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    metrics: dict[str, float]
    """Sums over micro-batches and DP ranks of the loss_fn's metrics (and `loss`)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    skipped: bool
    """True when the optimizer skipped the update (fp16 overflow)."""


class Actor:
    """A model (this rank's DDP-wrapped stage) plus, for training, its optimizer."""

    def __init__(self, model: list[torch.nn.Module], dims: ModelDims, topo: Topology, optimizer=None):
        from megatron.core.distributed import finalize_model_grads

        self.model, self.dims, self.topo, self.optimizer = model, dims, topo, optimizer
        self.gpt = unwrap_gpt(model[0])
        return_hidden_states(self.gpt)
        cfg = self.gpt.config
        cfg.finalize_model_grads_func = finalize_model_grads
        if hasattr(model[0], "no_sync"):
            cfg.no_sync_func = model[0].no_sync
        if optimizer is not None:
            cfg.grad_scale_func = optimizer.scale_loss

    # ------------------------------------------------------------------ schedule plumbing

    def _run(self, mbs: list[MicroBatch], loss_fn: LossFn | TokenSeparableLoss | None, *, forward_only: bool,
             temperature: float, with_entropy: bool) -> list[dict[str, Tensor]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        topo = self.topo
        # Megatron divides the loss by #micro-batches and DDP averages over DP x CP (after
        # the schedule multiplied by CP): undo both so gradients are plain sums of shares.
        scale = float(len(mbs) * topo.dp)
        for mb in mbs:
            check_cp_length(mb.tokens_BS.shape[1], topo.cp)
            mb.to_(topo.device)  # the trainer packs on the host; the model may be on a GPU
        if isinstance(loss_fn, TokenSeparableLoss) and topo.device.type == "cuda":
            # The same loss through its plain form (module docstring); it may need entropy.
            loss_fn, with_entropy = loss_fn.metrics, True

        def gather(x: Tensor | None) -> Tensor | None:
            if topo.cp == 1 or x is None:
                return x
            return cp_gather(x, topo.cp_group, topo.cp, topo.cp_rank)

        def fused_loss_func(mb: MicroBatch, labels: Tensor, hidden_BSH: Tensor):
            from megatron_rl.kernels import linear_logprobs_loss

            b, s, h = hidden_BSH.shape
            token_fn = loss_fn.token_loss(mb)
            if topo.cp > 1:  # this rank's rows -> rows of the whole sequences
                rows_BS = torch.arange(b * mb.tokens_BS.shape[1], device=hidden_BSH.device).view(b, -1)
                rows_N, inner = cp_slice(rows_BS, topo.cp, topo.cp_rank).reshape(-1), token_fn
                token_fn = lambda lp, en, rows: inner(lp, en, rows_N[rows])  # noqa: E731
            loss, logp_N, ent_N = linear_logprobs_loss(
                hidden_BSH.reshape(b * s, h), output_weight(self.gpt), labels.reshape(-1), token_fn,
                temperature=temperature, tp_group=topo.tp_group if topo.tp > 1 else None,
                vocab_size=self.dims.vocab_size,
            )
            with torch.no_grad():
                _, metrics = loss_fn.metrics(gather(logp_N.view(b, s)), gather(ent_N.view(b, s)), mb)
            metrics = {k: v.detach().float() for k, v in metrics.items()}
            # The loss actually trained: this CP rank's tokens, summed over CP ranks so that
            # it reads like every other metric (the same on every CP rank).
            trained = loss.detach().float().clone()
            if topo.cp > 1:
                dist.all_reduce(trained, group=topo.cp_group)
            metrics["loss"] = trained
            return loss * scale, metrics

        def loss_func(mb: MicroBatch, labels: Tensor, hidden_BSH: Tensor):
            if isinstance(loss_fn, TokenSeparableLoss):
                return fused_loss_func(mb, labels, hidden_BSH)
            logp, ent = token_logprobs(
                hidden_BSH, output_weight(self.gpt), labels, vocab_size=self.dims.vocab_size,
                temperature=temperature, tp_group=topo.tp_group if topo.tp > 1 else None,
                with_entropy=with_entropy,
            )
            logp, ent = gather(logp), gather(ent)
            if loss_fn is None:
                out = {"logp": logp.detach()}
                if ent is not None:
                    out["entropy"] = ent.detach()
                return logp.sum() * 0.0, out
            loss, metrics = loss_fn(logp, ent, mb)
            metrics = {k: v.detach().float() for k, v in metrics.items()}
            metrics["loss"] = loss.detach().float()
            return loss * scale, metrics

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens = cp_slice(mb.tokens_BS, topo.cp, topo.cp_rank)
            labels = cp_slice(mb.labels_BS, topo.cp, topo.cp_rank)
            pos = cp_slice(mb.position_ids_BS, topo.cp, topo.cp_rank)
            hidden = model(tokens, pos, attention_mask=None)
            return hidden, partial(loss_func, mb, labels)

        b, s = mbs[0].tokens_BS.shape
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(mbs),
            model=self.model,
            num_microbatches=len(mbs),
            seq_length=s // topo.cp,
            micro_batch_size=b,
            forward_only=forward_only,
        )

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def logprobs(self, mbs: list[MicroBatch], *, temperature: float,
                 with_entropy: bool = False) -> list[dict[str, Tensor]]:
        """Per micro-batch {"logp": [B, S] (, "entropy")}, full sequences, on every rank.

        ``temperature`` is the sampling temperature of the rollout (no default: a silent 1.0
        against a recipe sampling at 0.6 would skew every ratio).

        The last pipeline stage broadcasts them to the others.
        """
        for m in self.model:
            m.eval()
        outs = self._run(mbs, None, forward_only=True, temperature=temperature, with_entropy=with_entropy)
        return [self._share(outs[i] if outs else None, mbs[i]) for i in range(len(mbs))]

    def _share(self, out: dict[str, Tensor] | None, mb: MicroBatch) -> dict[str, Tensor]:
        topo = self.topo
        keys = ["logp", "entropy"] if out is None or "entropy" in out else ["logp"]
        flag = [keys]
        if topo.pp > 1:
            dist.broadcast_object_list(flag, src=dist.get_global_rank(topo.pp_group, topo.pp - 1),
                                       group=topo.pp_group)
        result = {}
        for k in flag[0]:
            local = out[k] if out is not None else None
            if topo.pp > 1:
                buf = local if local is not None else torch.empty(mb.tokens_BS.shape, dtype=torch.float32,
                                                                  device=topo.device)
                dist.broadcast(buf, src=dist.get_global_rank(topo.pp_group, topo.pp - 1), group=topo.pp_group)
                local = buf
            result[k] = local
        return result

    def train_step(self, mbs: list[MicroBatch], loss_fn: LossFn | TokenSeparableLoss, *,
                   temperature: float, with_entropy: bool = False) -> StepResult:
        """forward/backward over all micro-batches, then one optimizer update.

        ``with_entropy`` only matters for a plain ``LossFn`` (the fused path always has it).
        """
        metrics = self.forward_backward(mbs, loss_fn, temperature=temperature, with_entropy=with_entropy)
        return self.optimizer_step(metrics)

    def forward_backward(self, mbs: list[MicroBatch], loss_fn: LossFn | TokenSeparableLoss, *,
                         temperature: float, with_entropy: bool = False) -> dict[str, float]:
        """The gradients of one step, not yet applied (``optimizer_step`` applies them, or
        ``discard_gradients`` drops them: a caller may check something in between)."""
        assert self.optimizer is not None, "Actor built without an optimizer"
        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(mbs, loss_fn, forward_only=False, temperature=temperature, with_entropy=with_entropy)
        return self._reduce_metrics(outs)

    def optimizer_step(self, metrics: dict[str, float]) -> StepResult:
        ok, grad_norm, _ = self.optimizer.step()
        return StepResult(metrics=metrics, grad_norm=float(grad_norm or 0.0), skipped=not ok)

    def discard_gradients(self) -> None:
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()

    def _reduce_metrics(self, outs: list[dict[str, Tensor]]) -> dict[str, float]:
        """Sum metrics over micro-batches and DP ranks; broadcast from the last stage.

        CP ranks hold identical metrics (each evaluated the loss on whole sequences), so they
        are not summed over.
        """
        topo = self.topo
        names = [sorted(outs[0])] if outs else [None]
        if topo.pp > 1:
            dist.broadcast_object_list(names, src=dist.get_global_rank(topo.pp_group, topo.pp - 1),
                                       group=topo.pp_group)
        names = names[0] or []
        vec = torch.zeros(len(names), dtype=torch.float64, device=topo.device)
        if outs:
            for o in outs:
                vec += torch.stack([o[n].double() for n in names])
            if topo.dp > 1:
                dist.all_reduce(vec, group=topo.dp_group)
        if topo.pp > 1:
            dist.broadcast(vec, src=dist.get_global_rank(topo.pp_group, topo.pp - 1), group=topo.pp_group)
        return dict(zip(names, vec.tolist()))

