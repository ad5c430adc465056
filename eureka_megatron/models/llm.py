"""A Qwen2.5 / Qwen3-family LLM on megatron-core: the language half of our VLMs.

GQA (Qwen2.5: qkv bias; Qwen3: per-head q/k RMSNorm, no bias), RMSNorm, SwiGLU, RoPE with a
configurable theta, tied or untied embeddings; a dense MLP or megatron's MoE layer (Qwen3-MoE's
routing, experts split over expert-parallel ranks, tokens sent to them by all-to-all).
The layer spec is Transformer Engine's when it imports (GPU clusters) and megatron's local spec
otherwise; fp32 on CPU, bf16 through Float16Module on GPU.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal

import torch
import torch.nn.functional as F

from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.runtime import cpu_compat

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


@dataclass(frozen=True)
class BuildOptions:
    """How the models built inside `building(...)` are made (not what they are).

    initialize: megatron's random initialisation. Off for weights a load overwrites at once: no
        full master weight per parameter (use_cpu_initialization draws every matrix whole before
        splitting it, on every rank), which at 32B+ costs minutes and a full tensor of host
        memory. Everything built without it must be filled by a load (biases are left unset).
    recompute: activation recompute of the transformer layers (LLM and vision tower): none;
        selective (the attention core, megatron's default modules); full (every layer's input
        kept, the layer recomputed in the backward pass).
    meta: a build on the meta device that only counts (the memory planner): megatron's local
        spec (Transformer Engine allocates on a real device whatever the context) and no move
        to the GPU. Both specs hold the same parameters.
    """

    initialize: bool = True
    recompute: Literal["none", "selective", "full"] = "none"
    meta: bool = False


_OPTIONS: ContextVar[BuildOptions] = ContextVar("build_options", default=BuildOptions())


@contextmanager
def building(**options) -> Iterator[BuildOptions]:
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **options))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


def _recompute_fields(mode: str) -> dict:
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if mode == "selective":
        return dict(recompute_granularity="selective")
    return {}


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 -- TE raises RuntimeError (no cuDNN) as well as ImportError
        return False
    return torch.cuda.is_available()


def transformer_config(cfg: LLMConfig, par: ParallelConfig, **overrides):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if par.bf16 else torch.float32
    fields = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        qk_layernorm=cfg.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        # Initialise the full tensor then split it: TP1 and TP2 get identical weights.
        use_cpu_initialization=True,
        perform_initialization=_OPTIONS.get().initialize,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=par.bf16,
        # Losses arrive as (sum, count); megatron divides grads by the global count.
        calculate_per_token_loss=True,
        # Fusions that need TE/apex kernels stay off; the rest work on both stacks.
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        sequence_parallel=False,  # the LLM turns it on (`build_gpt`); vision towers never do
        deallocate_pipeline_outputs=True,
        # gloo matches point-to-point messages between a pair of ranks in posting order; with
        # PP2 + VPP the prev and next peer are the same rank, and batched isend/irecv then
        # swaps activations and gradients of the same shape. Ordered p2p ops avoid that.
        batch_p2p_comm=torch.cuda.is_available(),
    )
    if cfg.is_moe:
        fields.update(moe_fields(cfg, par))
    if overrides.get("pipeline_model_parallel_size", par.pipeline_parallel) > 1:
        fields.update(num_layers_in_first_pipeline_stage=par.first_stage_layers,
                      num_layers_in_last_pipeline_stage=par.last_stage_layers)
    fields.update(_recompute_fields(_OPTIONS.get().recompute))
    fields.update(overrides)
    return TransformerConfig(**fields)


def moe_fields(cfg: LLMConfig, par: ParallelConfig) -> dict:
    """megatron's MoE settings for Qwen3-MoE's routing: softmax over all experts, top-k, the k
    weights renormalised iff `norm_topk_prob`. megatron's softmax scorer without pre-softmax takes
    the top k logits and softmaxes over those k: exp(l_i) / sum_topk exp(l_j), which is HF's
    renormalised top-k of the full softmax; with pre-softmax it keeps the full softmax's top-k
    values as they are (HF without norm_topk_prob). The router runs in fp32 (logits and softmax)
    whatever the parameter dtype. Load balancing is off unless `moe_aux_loss_coeff` > 0 (then
    megatron's switch-transformer aux loss over each micro-batch's tokens)."""
    aux = float(cfg.moe_aux_loss_coeff)
    grouped = have_transformer_engine() and not _OPTIONS.get().meta
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_ffn_hidden_size=cfg.expert_ffn,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not cfg.norm_topk_prob,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_token_dispatcher_type="alltoall",
        # TE's grouped GEMM (TEGroupedMLP) on GPU: same torch_dist keys and per-expert global
        # tensors as the local spec's SequentialMLP (megatron maps them to each other)
        moe_grouped_gemm=grouped,
        moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size or None,
        moe_shared_expert_gate=bool(cfg.shared_expert_intermediate_size),
        expert_model_parallel_size=par.expert_parallel,
        expert_tensor_parallel_size=par.etp,
    )


class TorchNorm:
    """megatron's `WrappedTorchNorm` (torch's RMSNorm / LayerNorm), also under sequence
    parallelism, which megatron's refuses: each TP rank then normalises its own slice of the
    sequence, so the weights are marked `sequence_parallel` and megatron's `finalize_model_grads`
    sums their gradients over TP -- as Transformer Engine's norms do on GPU."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def layer_spec(config, vp_stage: int | None):
    """The decoder's block spec: Transformer Engine's layer on GPU; else megatron's local layer
    with `TorchNorm` for its norms and the final one (sequence parallelism on CPU) and
    `PackedDotProductAttention` (packed sequences on CPU). MoE layers (`config.num_moe_experts`):
    TE's grouped experts on GPU, the local SequentialMLP on CPU; both keep the MLP's norm under
    TE's key `pre_mlp_layernorm.weight` (the local spec would rename it as for a dense MLP)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                             get_num_layers_to_build)

    from eureka_megatron.models.packed_attention import PackedDotProductAttention  # megatron

    experts = config.num_moe_experts
    if have_transformer_engine() and not _OPTIONS.get().meta:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm)
    layer = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False,
                                                     normalization="RMSNorm",
                                                     qk_layernorm=config.qk_layernorm)
    if experts:
        layer.submodules.sharded_state_dict_keys_map = {
            k: v for k, v in layer.submodules.sharded_state_dict_keys_map.items()
            if k != "pre_mlp_layernorm."}
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    if config.qk_layernorm:  # per head: megatron normalises [.., heads, head_dim] over head_dim
        layer.submodules.self_attention.submodules.q_layernorm = TorchNorm
        layer.submodules.self_attention.submodules.k_layernorm = TorchNorm
    layer.submodules.self_attention.submodules.core_attention = PackedDotProductAttention
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=TorchNorm)


def stage_flags(vp_stage: int | None) -> tuple[bool, bool]:
    """(pre_process, post_process) of this rank's chunk `vp_stage`."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))


def build_gpt(cfg: LLMConfig, par: ParallelConfig, vp_stage: int | None = None,
              mrope_section: list[int] | None = None, scatter_embeddings: bool = True):
    """One GPTModel chunk of the LLM; `mrope_section` switches RoPE to Qwen2-VL's 3D mrope.
    `scatter_embeddings=False` (VLMs): under sequence parallelism the embedding keeps the whole
    sequence, so image embeddings can be merged in before `vlm.embed_with_images` scatters it."""
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(cfg, par, sequence_parallel=par.sequence_parallel,
                                **({"mrope_section": list(mrope_section)} if mrope_section else {}))
    pre, post = stage_flags(vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        scatter_embedding_sequence_parallel=scatter_embeddings,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="mrope" if mrope_section else "rope",
        rotary_base=cfg.rope_theta,
        vp_stage=vp_stage,
    )


def build_chunks(build_one, par: ParallelConfig) -> list[torch.nn.Module]:
    """`build_one(vp_stage)` for each virtual pipeline stage of this rank, on the current device."""
    cpu_compat.activate()
    from megatron.core.enums import ModelType

    chunks = []
    for vp in range(par.virtual_pipeline or 1):
        model = build_one(vp if par.virtual_pipeline else None)
        model.model_type = ModelType.encoder_or_decoder
        if torch.cuda.is_available() and not _OPTIONS.get().meta:
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def build_llm_chunks(cfg: LLMConfig, par: ParallelConfig) -> list[torch.nn.Module]:
    """This rank's LLM chunks (one per virtual pipeline stage); needs parallel_state.

    Weights are megatron's default init; call `models.init.layout_invariant_init` for weights
    that are identical at every TP/PP.
    """
    return build_chunks(lambda vp: build_gpt(cfg, par, vp), par)
