"""Qwen3 dense text models (Qwen3ForCausalLM): Qwen2's decoder without the qkv bias, with
per-head q/k RMSNorm and a head_dim of its own. The LLM of Qwen3-VL and InternVL3.5."""
from __future__ import annotations

from eureka_megatron.models.family import Family
from eureka_megatron.models.inputs import text_call, text_prepare
from eureka_megatron.models.llm import build_llm_chunks
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping

FAMILY = Family(
    name="qwen3", model_types=("qwen3",),
    config_from_hf=lambda hf, directory=None: llm_config_from_hf(hf),
    detect_layout=lambda names: "causal_lm",
    mapping=lambda cfg, layout: qwen2_mapping(cfg, "model.", "lm_head.weight"),
    build_chunks=build_llm_chunks, prepare=text_prepare, call=text_call,
    hf_model_type="qwen3", hf_class="Qwen3ForCausalLM", hf_layout="causal_lm")
