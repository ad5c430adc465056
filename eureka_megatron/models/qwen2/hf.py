"""The Qwen2 / Qwen2.5 / Qwen3 decoder: HF names <-> our megatron LLM (`models/llm.py`).
Qwen3 drops the qkv bias and adds per-head q/k RMSNorm weights ([head_dim], copied).

`hf_prefix` places the decoder inside a checkpoint: "model." for Qwen2ForCausalLM and for
Qwen2.5-VL's on-disk layout, "model.language_model." for the transformers >= 4.52 in-memory
layout, "language_model.model." for InternVL's original format. The output head lives outside the
decoder prefix, so it is given separately (`lm_head`; None when the embeddings are tied).
"""
from __future__ import annotations

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.mapping import Dims, Mapping, Rule

_L = "decoder.layers."


def qwen2_rules(hf_prefix: str = "model.", lm_head: str | None = "lm_head.weight") -> list[Rule]:
    p = hf_prefix + "layers.{i}."
    rules = [
        Rule("embedding.word_embeddings.weight", (hf_prefix + "embed_tokens.weight",), "pad_vocab"),
        Rule("decoder.final_layernorm.weight", (hf_prefix + "norm.weight",)),
        Rule(_L + "self_attention.linear_qkv.layer_norm_weight", (p + "input_layernorm.weight",),
             per_layer=True),
        Rule(_L + "self_attention.linear_qkv.weight",
             tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv", per_layer=True),
        Rule(_L + "self_attention.linear_qkv.bias",
             tuple(p + f"self_attn.{x}_proj.bias" for x in "qkv"), "qkv", per_layer=True),
        Rule(_L + "self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",),
             per_layer=True),
        Rule(_L + "mlp.linear_fc1.layer_norm_weight", (p + "post_attention_layernorm.weight",),
             per_layer=True),
        Rule(_L + "mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
             "concat", per_layer=True),
        Rule(_L + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",), per_layer=True),
    ]
    if lm_head is not None:
        rules.append(Rule("output_layer.weight", (lm_head,), "pad_vocab"))
    return rules


def qwen2_mapping(cfg: LLMConfig, hf_prefix: str = "model.", lm_head: str = "lm_head.weight") -> Mapping:
    dims = Dims(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.kv_channels,
                vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size)
    rules = qwen2_rules(hf_prefix, None if cfg.tie_word_embeddings else lm_head)
    if not cfg.qkv_bias:
        rules = [r for r in rules if not r.megatron.endswith("linear_qkv.bias")]
    if cfg.qk_norm:
        p = hf_prefix + "layers.{i}."
        rules += [Rule(_L + f"self_attention.{x}_layernorm.weight", (p + f"self_attn.{x}_norm.weight",),
                       per_layer=True) for x in "qk"]
    return Mapping(rules, dims)


QWEN3_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_vl_text", "qwen3_vl_moe_text")


def _rope_theta(hf: dict, default: float) -> float:
    params = hf.get("rope_parameters") or {}
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def llm_config_from_hf(hf: dict, where: str = "config.json", **fields) -> LLMConfig:
    """Our LLMConfig from a Qwen2- or Qwen3-style HF text config (top level or a `text_config`).
    Qwen3 (its model_types, or `qwen3=True` in `fields`) has q/k norms and `attention_bias`
    (default false) in place of Qwen2's unconditional qkv bias."""
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
    missing = [k for k in need if k not in hf]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    scaling = hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "mrope"):
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported "
                          "(default RoPE and mrope only)")
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{where}: use_sliding_window=true is not supported")
    if fields.pop("qwen3", False) or hf.get("model_type") in QWEN3_MODEL_TYPES:
        fields.setdefault("qk_norm", True)
        fields.setdefault("qkv_bias", bool(hf.get("attention_bias", False)))
    return LLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768), **fields)
