"""Build megatron-core ``GPTModel`` stages from ``ModelDims`` and the parallel layout.

Parallelism stays out of the model definition: the layer spec (local or Transformer Engine)
chooses the parallel layers, and ``Topology`` (already initialised) decides which pipeline
stage this rank builds.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megatron_rl.config.model import ModelConfig
from megatron_rl.config.parallel import ParallelConfig
from megatron_rl.models.hf_config import ModelDims

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the embedding rows to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def use_transformer_engine(model_cfg: ModelConfig) -> bool:
    if model_cfg.transformer_impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if model_cfg.transformer_impl == "transformer_engine":
            from megatron_rl.errors import ConfigError

            raise ConfigError(
                "`model.transformer_impl=transformer_engine` but Transformer Engine is not "
                "installed: `pip install megatron-rl[te]` on a CUDA machine, or use `local`."
            ) from None
        return False
    return torch.cuda.is_available()


def build_transformer_config(dims: ModelDims, par: ParallelConfig, model_cfg: ModelConfig):
    from megatron.core.transformer import TransformerConfig

    dtype = DTYPES[model_cfg.dtype]
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        ffn_hidden_size=dims.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=dims.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        qk_layernorm=dims.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=par.tp,
        pipeline_model_parallel_size=par.pp,
        context_parallel_size=par.cp,
        sequence_parallel=par.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # CPU: initialise the full master weight and split it, so TP=N equals TP=1 exactly.
        use_cpu_initialization=not on_gpu,
        # Fusions need apex/TE/CUDA kernels; the unfused paths are the same maths.
        masked_softmax_fusion=on_gpu and _fused_softmax_built(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # p2p: megatron calls torch.cuda.synchronize() after batched isend/irecv unless off.
        batch_p2p_comm=False,
        batch_p2p_sync=on_gpu,
        variable_seq_lengths=True,  # RL micro-batches differ in length; p2p sends shapes
        moe_token_dispatcher_type="alltoall",  # the only dispatcher megatron allows with it
        recompute_granularity=None if model_cfg.recompute == "none" else model_cfg.recompute,
        recompute_method="uniform" if model_cfg.recompute == "full" else None,
        recompute_num_layers=1 if model_cfg.recompute == "full" else None,
    )


def build_layer_spec(dims: ModelDims, model_cfg: ModelConfig, num_layers: int, cp: int = 1):
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if use_transformer_engine(model_cfg):
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=dims.qk_norm)
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_rl.models.norm import RMSNorm

    layer = specs.get_gpt_layer_local_spec(qk_layernorm=dims.qk_norm, normalization="RMSNorm")
    sub = layer.submodules
    norm = ModuleSpec(module=RMSNorm)
    attn_sub = sub.self_attention.submodules
    if dims.qk_norm:
        attn_sub = dataclasses.replace(attn_sub, q_layernorm=norm, k_layernorm=norm)
    if cp > 1:  # megatron's local attention refuses CP; ours all-gathers K/V over the CP group
        from megatron_rl.models.cp_attention import ContextParallelAttention

        attn_sub = dataclasses.replace(attn_sub, core_attention=ContextParallelAttention)
    attn = dataclasses.replace(sub.self_attention, submodules=attn_sub)
    sub = dataclasses.replace(sub, input_layernorm=norm, pre_mlp_layernorm=norm, self_attention=attn)
    layer = dataclasses.replace(layer, submodules=sub)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=norm)


def build_gpt_stage(
    dims: ModelDims,
    par: ParallelConfig,
    model_cfg: ModelConfig,
    *,
    pre_process: bool,
    post_process: bool,
):
    """One pipeline stage of the GPT model for this rank (topology must be initialised)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    config = build_transformer_config(dims, par, model_cfg)
    spec = build_layer_spec(dims, model_cfg, get_num_layers_to_build(config), par.cp)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(dims.vocab_size, model_cfg.make_vocab_size_divisible_by, par.tp),
        max_sequence_length=dims.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=dims.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(dims.rope_theta),
        rope_scaling=dims.rope_scaling_factor is not None,
        rope_scaling_factor=dims.rope_scaling_factor or 8.0,
    )


def _fused_softmax_built() -> bool:
    """Megatron's fused masked softmax needs a compiled extension (apex / NGC containers);
    without it megatron-core imports it anyway in 16-bit and fails (seen on an H200 with pip
    wheels), so the fusion is asked for only where the extension is importable."""
    import importlib.util

    return importlib.util.find_spec("scaled_masked_softmax_cuda") is not None
