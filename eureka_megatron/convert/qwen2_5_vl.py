"""Qwen2.5-VL: HF names <-> our megatron model (`models/qwen2_5_vl.py`).

Two HF layouts: on disk (`model.*`, `visual.*`, `lm_head.weight`; what `save_pretrained` writes)
and transformers >= 4.52 in memory (`model.language_model.*`, `model.visual.*`).
"""
from __future__ import annotations

from eureka_megatron.config import Qwen25VLConfig
from eureka_megatron.convert.mapping import Dims, Mapping, Rule
from eureka_megatron.convert.qwen2 import qwen2_mapping

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
