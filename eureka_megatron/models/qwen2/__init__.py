"""Qwen2 / Qwen2.5 text models (Qwen2ForCausalLM): the LLM every VLM family builds on."""
from __future__ import annotations

from eureka_megatron.models.family import Family
from eureka_megatron.models.inputs import text_call, text_prepare
from eureka_megatron.models.llm import build_llm_chunks
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping


def causal_lm_family(name: str, hf_class: str) -> Family:
    """A dense Qwen-decoder text family (`model_type` = `name`): Qwen2/2.5, Qwen3."""
    return Family(
        name=name, model_types=(name,),
        config_from_hf=lambda hf, directory=None: llm_config_from_hf(hf),
        detect_layout=lambda names: "causal_lm",
        mapping=lambda cfg, layout: qwen2_mapping(cfg, "model.", "lm_head.weight"),
        build_chunks=build_llm_chunks, prepare=text_prepare, call=text_call,
        hf_model_type=name, hf_class=hf_class, hf_layout="causal_lm")


FAMILY = causal_lm_family("qwen2", "Qwen2ForCausalLM")
