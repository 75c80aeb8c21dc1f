"""Token log-probs from a megatron GPT stage without building the [tokens x vocab] logits.

The last pipeline stage's output layer is switched (on this model instance only) to return
its input hidden states instead of logits; log-probs and entropy then come from
``megatron_rl.kernels.linear_logprobs`` on the hidden states and the local vocabulary shard
of the output weight. Context parallelism feeds each rank its part of the sequence the way
megatron splits it (2*cp chunks, rank r holding chunks r and 2*cp-1-r); the per-token
results are gathered back to full sequences before the loss, so sequence-level terms (GSPO's
sequence ratio, per-sequence token means) see whole sequences under any CP size.

Legend: B batch, S sequence (this CP rank's part when cp > 1), H hidden, V vocabulary.
Per-token tensors are aligned with input positions: column t is about token t+1 (the label),
so the last column of a row is padding.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rl.parallel.cp_layout import cp_slice, cp_unslice


@dataclass
class MicroBatch:
    """One micro-batch as the actor sees it (right-padded, position-aligned)."""

    tokens_BS: Tensor
    """Token ids (prompt + response), int64."""
    loss_mask_BS: Tensor
    """1.0 where column t's label (token t+1) is a trained response token, else 0."""
    old_logp_BS: Tensor | None = None
    """Log-probs of the labels under the policy that sampled (or the last actor pass)."""
    ref_logp_BS: Tensor | None = None
    """Reference-model log-probs of the labels (KL penalty); None when kl_coef == 0."""
    rollout_logp_BS: Tensor | None = None
    """The rollout engine's log-probs of the labels (mismatch correction)."""
    adv_BS: Tensor | None = None
    """Advantage of each label token (a sample's advantage broadcast over its tokens)."""
    weight_BS: Tensor | None = None
    """Per-token importance weights from rollout correction (1 where none)."""

    def to_(self, device: torch.device) -> MicroBatch:
        """Move every tensor to ``device`` in place. In place, not a copy: the loss
        functions store results on the caller's micro-batch (``train_logp_BS``), and callers
        read them back from their own objects."""
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and value.device != device:
                setattr(self, name, value.to(device))
        return self

    @property
    def labels_BS(self) -> Tensor:
        return torch.cat([self.tokens_BS[:, 1:], torch.zeros_like(self.tokens_BS[:, :1])], dim=1)

    @property
    def position_ids_BS(self) -> Tensor:
        s = self.tokens_BS.shape[1]
        return torch.arange(s, device=self.tokens_BS.device).expand_as(self.tokens_BS)


class _GatherSequence(torch.autograd.Function):
    """All-gather CP parts into the full sequence; backward keeps this rank's part.

    Every CP rank then evaluates the *same* loss on the full sequence, so the gradient of
    its own tokens is already complete locally: no reduction in backward (an all-reduce
    there would count the loss cp times).
    """

    @staticmethod
    def forward(ctx, x_BS: Tensor, group, cp: int, cp_rank: int) -> Tensor:
        import torch.distributed as dist

        ctx.cp, ctx.cp_rank = cp, cp_rank
        parts = [torch.empty_like(x_BS) for _ in range(cp)]
        dist.all_gather(parts, x_BS.contiguous(), group=group)
        return cp_unslice(parts)

    @staticmethod
    def backward(ctx, grad_BS: Tensor):
        return cp_slice(grad_BS, ctx.cp, ctx.cp_rank).contiguous(), None, None, None


def cp_gather(x_BS: Tensor, group, cp: int, cp_rank: int) -> Tensor:
    """This CP rank's per-token tensor -> the full sequence (differentiable, see above)."""
    return x_BS if cp == 1 else _GatherSequence.apply(x_BS, group, cp, cp_rank)


def _hidden_states_forward(self, input_, weight=None, runtime_gather_output=None):
    """ColumnParallelLinear.forward minus the matmul: returns (hidden, None).

    ``linear_logprobs`` returns the complete hidden-state gradient on every TP rank (it
    all-reduces it itself), so the TP-region copy the layer would apply must be left out
    here, or the gradient would be summed twice. Under sequence parallel the shards are
    all-gathered with a backward that only keeps this rank's slice of that gradient.
    """
    if self.sequence_parallel:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        return gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False), None
    return input_, None


def return_hidden_states(gpt_model) -> None:
    """Make the last stage's forward return hidden states [B, S, H] instead of logits."""
    if gpt_model.post_process and not getattr(gpt_model.output_layer, "_returns_hidden", False):
        gpt_model.output_layer.forward = types.MethodType(_hidden_states_forward, gpt_model.output_layer)
        gpt_model.output_layer._returns_hidden = True


def output_weight(gpt_model) -> Tensor:
    """The local vocabulary shard [V_local, H] of the output layer (tied: the embedding)."""
    if gpt_model.share_embeddings_and_output_weights:
        return gpt_model.shared_embedding_or_output_weight()
    return gpt_model.output_layer.weight


def token_logprobs(
    hidden_BSH: Tensor, weight_VH: Tensor, labels_BS: Tensor, *, vocab_size: int,
    temperature: float = 1.0, tp_group=None, with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Label log-probs [B, S] (and entropy) over the true vocabulary, fp32.

    Rows of the padded vocabulary (ids >= vocab_size) are excluded from the softmax: the
    rollout engine never samples them, so counting them would bias every log-prob.
    """
    from megatron_rl.kernels import linear_logprobs

    b, s, h = hidden_BSH.shape
    logp_N, ent_N = linear_logprobs(
        hidden_BSH.reshape(b * s, h), weight_VH, labels_BS.reshape(-1), temperature=temperature,
        tp_group=tp_group, return_entropy=with_entropy, vocab_size=vocab_size,
    )
    return logp_N.view(b, s), (ent_N.view(b, s) if with_entropy and ent_N is not None else None)
