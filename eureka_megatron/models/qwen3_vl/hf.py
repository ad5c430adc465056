"""Qwen3-VL: HF names <-> our megatron model (`model.py` beside this file).

One naming on both sides: the hub's safetensors, what transformers 5.x `save_pretrained` writes
(no conversion mapping for qwen3_vl) and `Qwen3VLForConditionalGeneration.state_dict()` all say
`model.visual.*`, `model.language_model.*`, `lm_head.weight`. Both layout names the code asks for
("disk": checkpoints and SGLang; "memory": the transformers model) are that naming.

The tower's rules (`vision_mapping`) and the config readers are shared with Qwen3-VL-MoE, which
only brings its own LLM mapping (`qwen3_vl_mapping(..., text_mapping=...)`).
"""
from __future__ import annotations

import math
from typing import Callable

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.mapping import Dims, Mapping, MappingError, Rule
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.qwen3_vl.config import Qwen3VLConfig, Qwen3VLVisionConfig

TEXT_PREFIX, VISION_PREFIX = "model.language_model.", "model.visual."
LAYOUTS = ("disk", "memory")  # the same names (see above)
SUPPORTED_VISION_ACT = "gelu_pytorch_tanh"

_L = "decoder.layers."


def _merger_rules(megatron: str, hf: str) -> list[Rule]:
    """A patch merger: LayerNorm, then fc1 - GELU - fc2 (megatron's MultimodalProjector)."""
    pairs = [("norm.weight", "norm.weight"), ("norm.bias", "norm.bias")] + [
        (f"projection.encoder.linear_fc{i}.{w}", f"linear_fc{i}.{w}")
        for i in (1, 2) for w in ("weight", "bias")]
    return [Rule(megatron + m, (hf + h,)) for m, h in pairs]


def vision_rules(v: Qwen3VLVisionConfig, p: str = VISION_PREFIX) -> list[Rule]:
    b = p + "blocks.{i}."
    layer = [
        (_L + "self_attention.linear_qkv.layer_norm_weight", (b + "norm1.weight",), "copy"),
        (_L + "self_attention.linear_qkv.layer_norm_bias", (b + "norm1.bias",), "copy"),
        (_L + "self_attention.linear_qkv.weight", (b + "attn.qkv.weight",), "fused_qkv"),
        (_L + "self_attention.linear_qkv.bias", (b + "attn.qkv.bias",), "fused_qkv"),
        (_L + "self_attention.linear_proj.weight", (b + "attn.proj.weight",), "copy"),
        (_L + "self_attention.linear_proj.bias", (b + "attn.proj.bias",), "copy"),
        (_L + "mlp.linear_fc1.layer_norm_weight", (b + "norm2.weight",), "copy"),
        (_L + "mlp.linear_fc1.layer_norm_bias", (b + "norm2.bias",), "copy"),
        (_L + "mlp.linear_fc1.weight", (b + "mlp.linear_fc1.weight",), "concat"),  # pads the width
        (_L + "mlp.linear_fc1.bias", (b + "mlp.linear_fc1.bias",), "concat"),
        (_L + "mlp.linear_fc2.weight", (b + "mlp.linear_fc2.weight",), "ffn_cols"),
        (_L + "mlp.linear_fc2.bias", (b + "mlp.linear_fc2.bias",), "copy"),
    ]
    rules = [Rule(k, hf, t, per_layer=True) for k, hf, t in layer] + [
        Rule("patch_embed.proj.weight", (p + "patch_embed.proj.weight",)),
        Rule("patch_embed.proj.bias", (p + "patch_embed.proj.bias",)),
        Rule("pos_embed.weight", (p + "pos_embed.weight",)),
    ] + _merger_rules("merger.", p + "merger.")
    for j in range(len(v.deepstack_visual_indexes)):
        rules += _merger_rules(f"deepstack_mergers.{j}.", p + f"deepstack_merger_list.{j}.")
    return rules


def vision_mapping(v: Qwen3VLVisionConfig, prefix: str = VISION_PREFIX) -> Mapping:
    """The tower (blocks, patch and position embeddings, merger, DeepStack mergers)."""
    return Mapping(vision_rules(v, prefix),
                   Dims(num_layers=v.depth, num_heads=v.num_heads, num_kv_heads=v.num_heads,
                        head_dim=v.head_dim, ffn=v.intermediate_size,
                        padded_ffn=v.padded_intermediate_size),
                   "vision_model.")


def qwen3_vl_mapping(cfg: Qwen3VLConfig, layout: str = "disk",
                     text_mapping: Callable[[LLMConfig, str, str], Mapping] = qwen2_mapping) -> Mapping:
    """The whole model; `text_mapping(cfg.text, decoder prefix, lm_head name)` maps the LLM
    (Qwen3's dense decoder by default; Qwen3-VL-MoE passes its expert rules)."""
    if layout not in LAYOUTS:
        raise MappingError(f"unknown Qwen3-VL layout {layout!r}; known: {', '.join(LAYOUTS)}")
    text = text_mapping(cfg.text, TEXT_PREFIX, "lm_head.weight").with_prefix("language_model.")
    return text + vision_mapping(cfg.vision)


def detect_layout(names: set[str]) -> str:
    """Qwen3-VL has one naming (`model.visual.*`, `model.language_model.*`): "memory"."""
    if any(n.startswith(VISION_PREFIX) for n in names) and any(
            n.startswith(TEXT_PREFIX) for n in names):
        return "memory"
    raise MappingError("not a Qwen3-VL state dict: no `model.visual.*` and `model.language_model.*` "
                       f"names (first names: {', '.join(sorted(names)[:4])})")


def _int(x, key: str) -> int:
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ConfigError(f"config.json: vision_config.{key}={x} (unequal axes) is not supported")
        x = x[0]
    return int(x)


def vision_config_from_hf(v: dict | None) -> Qwen3VLVisionConfig:
    """The tower from config.json's `vision_config` (Qwen3-VL and Qwen3-VL-MoE alike)."""
    if not v:
        raise ConfigError("config.json: missing vision_config")
    need = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
            "num_position_embeddings", "deepstack_visual_indexes")
    missing = [k for k in need if k not in v]
    if missing:
        raise ConfigError(f"config.json: vision_config has no {', '.join(missing)}")
    act = v.get("hidden_act", SUPPORTED_VISION_ACT)
    if act != SUPPORTED_VISION_ACT:
        raise ConfigError(f"config.json: vision_config.hidden_act {act!r} is not supported "
                          f"({SUPPORTED_VISION_ACT})")
    n = int(v["num_position_embeddings"])
    if math.isqrt(n) ** 2 != n:
        raise ConfigError(f"config.json: vision_config.num_position_embeddings={n} is not a "
                          "square grid")
    deep = [int(i) for i in v["deepstack_visual_indexes"]]
    if any(not 0 <= i < v["depth"] for i in deep) or len(set(deep)) != len(deep):
        raise ConfigError(f"config.json: vision_config.deepstack_visual_indexes={deep} must be "
                          f"distinct block indexes below depth={v['depth']}")
    rope = v.get("rope_parameters") or {}
    if rope.get("rope_type", "axial") != "axial":
        raise ConfigError(f"config.json: vision_config.rope_parameters.rope_type "
                          f"{rope['rope_type']!r} is not supported (axial)")
    if v["hidden_size"] % v["num_heads"]:
        raise ConfigError("config.json: vision_config.hidden_size is not a multiple of num_heads")
    return Qwen3VLVisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"], in_channels=v.get("in_channels", 3),
        patch_size=_int(v.get("patch_size", 16), "patch_size"),
        temporal_patch_size=_int(v.get("temporal_patch_size", 2), "temporal_patch_size"),
        spatial_merge_size=v.get("spatial_merge_size", 2), out_hidden_size=v["out_hidden_size"],
        num_position_embeddings=n, deepstack_visual_indexes=deep,
        rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))))


def text_dict(hf: dict) -> dict:
    """config.json's `text_config`, with the top-level tie_word_embeddings (what transformers
    ties by) and the rope parameters checked."""
    text = hf.get("text_config")
    if not text:
        raise ConfigError("config.json: missing text_config")
    text = dict(text)
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings",
                                              text.get("tie_word_embeddings", False)))
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConfigError(f"config.json: text_config rope_type {kind!r} is not supported "
                          "(Qwen3-VL's default interleaved mrope)")
    return text


def mrope_section_from_hf(text: dict) -> list[int]:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    section = list(rope.get("mrope_section", [24, 20, 20]))  # transformers' default
    if len(section) != 3:
        raise ConfigError(f"config.json: text_config mrope_section={section} needs 3 entries (T, H, W)")
    return section


def config_from_hf(hf: dict, text_config_from_hf: Callable[..., LLMConfig] = llm_config_from_hf
                   ) -> Qwen3VLConfig:
    """Our config from a Qwen3-VL config.json (the hub's: `text_config` + `vision_config`)."""
    text = text_dict(hf)
    if text.get("model_type") not in (None, "qwen3_vl_text", "qwen3_vl_moe_text"):
        raise ConfigError(f"config.json: text_config.model_type {text['model_type']!r} is not a "
                          "Qwen3-VL text model")
    llm = text_config_from_hf({k: v for k, v in text.items() if k != "rope_scaling"},
                              "config.json (text_config)", qwen3=True)
    vision = vision_config_from_hf(hf.get("vision_config"))
    if vision.out_hidden_size != llm.hidden_size:
        raise ConfigError(f"config.json: vision_config.out_hidden_size={vision.out_hidden_size} != "
                          f"text_config.hidden_size={llm.hidden_size}")
    return Qwen3VLConfig(text=llm, vision=vision, mrope_section=mrope_section_from_hf(text),
                         image_token_id=hf.get("image_token_id", 151655),
                         vision_start_token_id=hf.get("vision_start_token_id", 151652))
