"""Qwen3-MoE text models (Qwen3MoeForCausalLM): Qwen3's attention with every MLP a Mixture of
Experts (a softmax router over E SwiGLU experts, top-k, optionally renormalised). The LLM of
Qwen3-VL-MoE. Layouts: "disk" (hub checkpoints, save_pretrained, SGLang: one tensor per expert and
projection) and "memory" (transformers' in-memory model: each layer's experts stacked in
`gate_up_proj` / `down_proj`); see `models/qwen2/hf.py`."""
from __future__ import annotations

import dataclasses

from eureka_megatron.models.family import Family
from eureka_megatron.models.inputs import text_call, text_prepare
from eureka_megatron.models.llm import build_llm_chunks
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping


def detect_layout(names: set[str]) -> str:
    """memory (stacked `mlp.experts.gate_up_proj`) or disk (per-expert tensors)."""
    return "memory" if any(n.endswith("mlp.experts.gate_up_proj") for n in names) else "disk"


def mapping(cfg, layout: str):
    return qwen2_mapping(cfg, "model.", "lm_head.weight",
                         experts="stacked" if layout == "memory" else "per_expert")


def trainable(cfg, model_section):
    """The run's load-balancing loss weight (`model.moe_aux_loss_coeff`, 0 = off)."""
    return dataclasses.replace(cfg, moe_aux_loss_coeff=float(
        getattr(model_section, "moe_aux_loss_coeff", 0.0)))


FAMILY = Family(
    name="qwen3_moe", model_types=("qwen3_moe",),
    config_from_hf=lambda hf, directory=None: llm_config_from_hf(hf),
    detect_layout=detect_layout, mapping=mapping,
    build_chunks=build_llm_chunks, prepare=text_prepare, call=text_call,
    hf_model_type="qwen3_moe", hf_class="Qwen3MoeForCausalLM", hf_layout="memory",
    trainable=trainable)
