"""Unfused reference: full logits, log_softmax, entropy. For tests and benchmarks only.

This is what the fused kernels replace: it materialises ``logits_NV`` and several tensors of
the same size (log-softmax, probabilities; more in backward). At N=8192 tokens and a
151,936-word vocabulary each is 5 GB in fp32. Written the way RL code usually does it
(logits in the input dtype, as the output layer produces them; softmax maths in fp32), so
that it serves both as the float64 ground truth and as the "low-precision eager" baseline.

Shape suffixes: N tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import torch


def linear_logprobs_reference(
    hidden_NH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_N: torch.Tensor,
    *,
    temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each label, entropy) from materialised logits; autograd through both.

    ``compute_dtype`` casts hidden and weight first (float64 for ground truth). Logits come
    out in that dtype; 16-bit logits are upcast to fp32 before the softmax maths.
    """
    if compute_dtype is not None:
        hidden_NH, weight_VH = hidden_NH.to(compute_dtype), weight_VH.to(compute_dtype)
    logits_NV = hidden_NH @ weight_VH.T
    if logits_NV.dtype in (torch.float16, torch.bfloat16):
        logits_NV = logits_NV.float()
    logits_NV = logits_NV / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    del logits_NV  # log_softmax keeps its output for backward, not its input
    logprobs_N = logp_NV.gather(1, labels_N.long()[:, None]).squeeze(1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(dim=-1)
    return logprobs_N, entropy_N
