"""Per-GPU memory formulas (bytes). Each function states its formula; sizes are per rank.

Conventions (Megatron mixed precision, as the actor runs): bf16 weights (2 B/param), fp32
gradients in ``main_grad`` (4 B/param), fp32 master weights and Adam m, v (12 B/param). The
distributed optimizer shards those 12 B over the data-parallel-with-context-parallel group
(dp * cp ranks); weights and gradients are never sharded by it.
Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models") counted tensor by tensor for a SwiGLU/GQA layer with flash attention
(no s x s score matrix is stored) and no dropout (RL training uses none).
"""

from __future__ import annotations

from megatron_rl.plan.models import ModelDims

OVERHEAD_NOTE = "CUDA context, NCCL buffers, allocator fragmentation (a constant)"


def params_per_rank(m: ModelDims, tp: int, pp: int) -> float:
    """Parameters one rank holds: layers split over pp stages and tp shards; the embedding and
    output layer are split over tp (vocab-parallel) and sit on the first/last stage (count
    them fully on the worst stage)."""
    return (m.layers / pp * m.layer_params + m.embedding_params) / tp


def weights_bytes(p_rank: float, dtype_bytes: int) -> float:
    """Model weights in the training dtype: p_rank * dtype_bytes."""
    return p_rank * dtype_bytes


def grads_bytes(p_rank: float) -> float:
    """fp32 gradient buffer (Megatron ``main_grad``): 4 * p_rank."""
    return 4.0 * p_rank


def optimizer_bytes(p_rank: float, dp: int, cp: int, distributed: bool, fp32_model: bool) -> float:
    """Adam m and v (8 B) plus fp32 master weights (4 B, none when the model is already fp32),
    divided by dp * cp under the distributed optimizer."""
    per_param = 8.0 if fp32_model else 12.0
    return per_param * p_rank / (dp * cp if distributed else 1)


def layer_act_bytes_per_token(m: ModelDims, tp: int, sp: bool, act_bytes: int, *, unfused: bool = False,
                              attn_len: int | None = None) -> float:
    """Activations one layer stores per token for its backward, times the activation dtype size.

    Fused layers (Transformer Engine, flash attention, SwiGLU): norm inputs/outputs 4h (split
    over tp only with sequence parallel), Q/K/V (h_q + 2 h_kv)/tp, attention output h_q/tp, MLP
    gate and up 2 ffn/tp and the SwiGLU output ffn/tp.

    ``unfused`` (megatron-core's local spec, the CPU path): what autograd keeps when every op is
    a separate torch op, counted with ``torch.autograd.graph.saved_tensors_hooks`` on the demo
    model: 7.75 h (torch RMSNorm's input, normalised and scaled copies, residuals, attention
    output), 3 h_q (Q, and K expanded to every query head, also transposed), 5 ffn (the fc1
    output, its gate and up halves, SiLU's output and the product). ``attn_len`` (non-flash
    attention): the softmax's output, heads/tp x ``attn_len`` per token.
    """
    seq_split = tp if sp else 1
    q, kv = m.heads * m.hd, m.kv_heads * m.hd
    if unfused:
        elems = 7.75 * m.hidden / seq_split + 3 * q / tp + 5 * m.ffn / tp
    else:
        elems = 4 * m.hidden / seq_split + (q + 2 * kv) / tp + q / tp + 3 * m.ffn / tp
    if attn_len:
        elems += m.heads / tp * attn_len
    return elems * act_bytes


def activations_bytes(m: ModelDims, tokens: int, *, tp: int, pp: int, cp: int, sp: bool,
                      recompute: str, act_bytes: int, unfused: bool = False, attn_len: int | None = None) -> float:
    """Activations of one micro-batch of ``tokens`` tokens on the busiest rank, plus the
    backward's working set: the gradients of one layer's activations at a time.

    Each rank holds tokens / cp of the sequence. none/selective: every layer of the stage keeps
    its activations (with flash attention, selective recompute saves nothing more). full: each
    layer keeps only its input (h/tp with SP, else h per token) and one layer's activations
    are rebuilt at a time in the backward. With pp > 1 the first stage holds pp micro-batches
    in flight (1F1B), so a stage's layers/pp times pp in flight = all layers' worth.
    ``unfused`` / ``attn_len``: see ``layer_act_bytes_per_token``.
    """
    t_rank = tokens / cp
    per_layer = layer_act_bytes_per_token(m, tp, sp, act_bytes, unfused=unfused, attn_len=attn_len) * t_rank
    layers_held = m.layers / pp * pp  # 1F1B: pp in-flight micro-batches on stage 0
    if recompute == "full":
        layer_input = m.hidden / (tp if sp else 1) * act_bytes * t_rank
        return layers_held * layer_input + 2 * per_layer  # the rebuilt layer and its gradients
    return layers_held * per_layer + per_layer


def logits_bytes(m: ModelDims, tokens: int, *, tp: int, cp: int, fused: bool, chunk_bytes: float = 256 * 2**20) -> float:
    """Output-layer memory for the log-probs/entropy of ``tokens`` tokens (vocab split over tp,
    sequence over cp; SP gathers the sequence before the output layer).

    unfused: the [T, V/tp] logits in bf16 (2 B), their fp32 copy for the log-softmax (4 B) and
    its fp32 gradient (4 B): 10 B per element. fused (``kernels.linear_logprobs``): one fp32
    chunk buffer of at most ``chunk_bytes`` plus a few fp32 per-token statistics (16 B/token).
    """
    t_rank = tokens / cp
    if fused:
        return min(chunk_bytes, 4.0 * t_rank * m.vocab / tp) + 16.0 * t_rank
    return 10.0 * t_rank * m.vocab / tp


def kv_bytes_per_token(m: ModelDims, server_tp: int, kv_bytes: int = 2) -> float:
    """KV cache per token on one server GPU: K and V, every layer, kv_heads/tp heads of head_dim
    (kv heads are replicated when tp > kv_heads)."""
    heads = max(m.kv_heads / server_tp, 1.0)
    return 2 * m.layers * heads * m.hd * kv_bytes


def server_weights_bytes(m: ModelDims, server_tp: int) -> float:
    """bf16 weights of one rollout server shard: 2 * params / server_tp."""
    return 2.0 * m.params / server_tp
