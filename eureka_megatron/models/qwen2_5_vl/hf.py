"""Qwen2.5-VL: HF names <-> our megatron model (`model.py` beside this file).

Two HF layouts: on disk (`model.*`, `visual.*`, `lm_head.weight`; what `save_pretrained` writes)
and transformers >= 4.52 in memory (`model.language_model.*`, `model.visual.*`).
"""
from __future__ import annotations

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.mapping import Dims, Mapping, MappingError, Rule
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig

LAYOUTS = {  # layout -> (LLM decoder prefix, vision prefix)
    "disk": ("model.", "visual."),
    "memory": ("model.language_model.", "model.visual."),
}

_L = "decoder.layers."


def vision_rules(p: str) -> list[Rule]:
    b = p + "blocks.{i}."
    layer = [
        (_L + "self_attention.linear_qkv.layer_norm_weight", (b + "norm1.weight",), "copy"),
        (_L + "self_attention.linear_qkv.weight", (b + "attn.qkv.weight",), "fused_qkv"),
        (_L + "self_attention.linear_qkv.bias", (b + "attn.qkv.bias",), "fused_qkv"),
        (_L + "self_attention.linear_proj.weight", (b + "attn.proj.weight",), "copy"),
        (_L + "self_attention.linear_proj.bias", (b + "attn.proj.bias",), "copy"),
        (_L + "mlp.linear_fc1.layer_norm_weight", (b + "norm2.weight",), "copy"),
        (_L + "mlp.linear_fc1.weight", (b + "mlp.gate_proj.weight", b + "mlp.up_proj.weight"), "concat"),
        (_L + "mlp.linear_fc1.bias", (b + "mlp.gate_proj.bias", b + "mlp.up_proj.bias"), "concat"),
        (_L + "mlp.linear_fc2.weight", (b + "mlp.down_proj.weight",), "ffn_cols"),
        (_L + "mlp.linear_fc2.bias", (b + "mlp.down_proj.bias",), "copy"),
    ]
    return [Rule(k, hf, t, per_layer=True) for k, hf, t in layer] + [
        Rule("patch_embed.proj.weight", (p + "patch_embed.proj.weight",)),
        Rule("ln_q.weight", (p + "merger.ln_q.weight",)),
        Rule("projection.encoder.linear_fc1.weight", (p + "merger.mlp.0.weight",)),
        Rule("projection.encoder.linear_fc1.bias", (p + "merger.mlp.0.bias",)),
        Rule("projection.encoder.linear_fc2.weight", (p + "merger.mlp.2.weight",)),
        Rule("projection.encoder.linear_fc2.bias", (p + "merger.mlp.2.bias",)),
    ]


def qwen2_5_vl_mapping(cfg: Qwen25VLConfig, layout: str = "disk") -> Mapping:
    text_prefix, vision_prefix = LAYOUTS[layout]
    v = cfg.vision
    text = qwen2_mapping(cfg.text, text_prefix, "lm_head.weight").with_prefix("language_model.")
    vision = Mapping(vision_rules(vision_prefix),
                     Dims(num_layers=v.depth, num_heads=v.num_heads, num_kv_heads=v.num_heads,
                          head_dim=v.hidden_size // v.num_heads, ffn=v.intermediate_size,
                          padded_ffn=v.padded_intermediate_size),
                     "vision_model.")
    return text + vision


def config_from_hf(hf: dict) -> Qwen25VLConfig:
    """Our config from a Qwen2.5-VL config.json: hub files keep the text fields at the top
    level, transformers 5.x writes them under `text_config`."""
    text = dict(hf.get("text_config") or hf)
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if "mrope_section" not in rope:
        raise ConfigError("config.json: rope_scaling/rope_parameters has no mrope_section")
    v = hf.get("vision_config")
    if not v:
        raise ConfigError("config.json: missing vision_config")
    vision_fields = {f: v[f] for f in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                       "in_channels", "patch_size", "temporal_patch_size",
                                       "spatial_merge_size", "window_size",
                                       "fullatt_block_indexes", "out_hidden_size") if f in v}
    if v.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: vision_config.hidden_act {v['hidden_act']!r} "
                          "is not supported (silu)")
    if "out_hidden_size" not in vision_fields:
        vision_fields["out_hidden_size"] = text["hidden_size"]
    return Qwen25VLConfig(
        text=llm_config_from_hf(text, "config.json (text)"),
        vision=Qwen25VisionConfig(**vision_fields),
        mrope_section=list(rope["mrope_section"]),
        image_token_id=hf.get("image_token_id", 151655),
        vision_start_token_id=hf.get("vision_start_token_id", 151652))


def detect_layout(names: set[str]) -> str:
    """disk (`visual.*`, `model.layers.*`) or memory (`model.visual.*`, `model.language_model.*`)."""
    if any(n.startswith("model.language_model.") for n in names):
        return "memory"
    if any(n.startswith("visual.") for n in names):
        return "disk"
    raise MappingError("not a Qwen2.5-VL state dict: no `visual.*` or `model.language_model.*` "
                       f"names (first names: {', '.join(sorted(names)[:4])})")
