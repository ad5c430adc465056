"""InternVL2.5 / InternVL3 / InternVL3.5: HF names <-> our megatron model (`model.py` beside this
file).

Three HF layouts:
  chat           OpenGVLab's original `internvl_chat` checkpoints (remote code; same names on disk
                 and in memory): vision_model.*, mlp1.*, language_model.* with a Qwen2 or Qwen3
                 LLM (language_model.model.*, language_model.lm_head.weight; Qwen3 adds
                 self_attn.q_norm / k_norm) or an InternLM2 LLM (tok_embeddings, attention.wqkv,
                 feed_forward.w1/w3/w2, language_model.output).
  native_disk    transformers' InternVLForConditionalGeneration as `save_pretrained` writes it:
                 vision_tower.*, multi_modal_projector.*, language_model.model.*,
                 language_model.lm_head.weight.
  native_memory  the same model's state_dict: model.vision_tower.*, model.multi_modal_projector.*,
                 model.language_model.*, lm_head.weight.
InternLM2's fused `wqkv` is already megatron's per-KV-group [q_g; k_g; v_g] order, so it is copied.
In the native layouts InternLM2 is a Llama (no qkv bias), named like Qwen2.

InternVL3.5 (OpenGVLab/InternVL3_5-1B..38B) is InternVL3's vision side with a dense Qwen3 LLM:
llm_config.architectures ["Qwen3ForCausalLM"] in the chat format, text_config.model_type "qwen3"
in the native one. Its <IMG_CONTEXT> id is not InternVL3's 151667 (that is Qwen3's <think>): the
chat format reads it from tokenizer_config.json, the native config stores it.

Not supported (clear errors in `config_from_hf`): rope scaling other than InternLM2's dynamic NTK
(which only acts beyond max_position_embeddings: accepted with a warning, longer sequences would
differ), ps_version v1, force_image_size != vision image_size, biased InternLM2 / Llama / Qwen3
layers, sliding-window Qwen2 / Qwen3, vision feature layer lists, and the InternVL3.5 models
whose LLM is a mixture of experts (Qwen3-MoE: 30B-A3B, 241B-A28B; GPT-OSS: 20B-A4B). The Flash
variants' extra tensors (their visual resolution router) have no mapping: conversion lists them.
"""
from __future__ import annotations

import warnings

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.internvl.config import InternVisionConfig, InternVLConfig
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.mapping import Dims, Mapping, MappingError, Rule
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping

LAYOUTS = {  # layout -> (vision prefix, projector prefix, LLM decoder prefix, output head)
    "chat": ("vision_model.", "mlp1.", "language_model.model.", "language_model.lm_head.weight"),
    "native_disk": ("vision_tower.", "multi_modal_projector.", "language_model.model.",
                    "language_model.lm_head.weight"),
    "native_memory": ("model.vision_tower.", "model.multi_modal_projector.",
                      "model.language_model.", "lm_head.weight"),
}

_VISION_NAMES = {  # name style -> HF names inside the vision tower
    "chat": dict(layer="encoder.layers.{i}.", norm1="norm1", norm2="norm2", qkv=("attn.qkv",),
                 q_norm="attn.q_norm", k_norm="attn.k_norm", proj="attn.proj", ls1="ls1", ls2="ls2",
                 patch="embeddings.patch_embedding", cls="embeddings.class_embedding",
                 pos="embeddings.position_embedding"),
    "native": dict(layer="encoder.layer.{i}.", norm1="layernorm_before", norm2="layernorm_after",
                   qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                   q_norm="attention.q_norm", k_norm="attention.k_norm",
                   proj="attention.projection_layer", ls1="lambda_1", ls2="lambda_2",
                   patch="embeddings.patch_embeddings.projection", cls="embeddings.cls_token",
                   pos="embeddings.position_embeddings"),
}
_PROJECTOR_NAMES = {"chat": ("0", "1", "3"), "native": ("layer_norm", "linear_1", "linear_2")}

_L = "decoder.layers."


def vision_rules(v: InternVisionConfig, prefix: str, style: str) -> list[Rule]:
    n = _VISION_NAMES[style]
    b = prefix + n["layer"]
    qkv = "fused_qkv" if len(n["qkv"]) == 1 else "qkv"
    norms = ("weight", "bias") if v.norm_type == "layer_norm" else ("weight",)
    layer = [(_L + "self_attention.linear_qkv.weight", [x + ".weight" for x in n["qkv"]], qkv),
             (_L + "self_attention.linear_proj.weight", [n["proj"] + ".weight"], "head_cols"),
             (_L + "self_attention.linear_proj.bias", [n["proj"] + ".bias"], "copy"),
             (_L + "ls1", [n["ls1"]], "copy"),
             (_L + "ls2", [n["ls2"]], "copy")]
    layer += [(_L + f"mlp.linear_{fc}.{w}", [f"mlp.{fc}.{w}"], "copy")
              for fc in ("fc1", "fc2") for w in ("weight", "bias")]
    layer += [(_L + f"{meg}.layer_norm_{w}", [f"{n[hf]}.{w}"], "copy") for w in norms
              for meg, hf in (("self_attention.linear_qkv", "norm1"), ("mlp.linear_fc1", "norm2"))]
    if v.qkv_bias:
        layer.append((_L + "self_attention.linear_qkv.bias", [x + ".bias" for x in n["qkv"]], qkv))
    if v.qk_normalization:
        layer += [(_L + f"self_attention.{x}_layernorm.weight", [n[x + "_norm"] + ".weight"],
                   "head_rows") for x in "qk"]
    return [Rule(k, tuple(b + h for h in hf), t, per_layer=True) for k, hf, t in layer] + [
        Rule("conv1.weight", (prefix + n["patch"] + ".weight",)),
        Rule("conv1.bias", (prefix + n["patch"] + ".bias",)),
        Rule("class_token", (prefix + n["cls"],)),
        Rule("position_embedding", (prefix + n["pos"],)),
    ]


def projector_rules(prefix: str, style: str) -> list[Rule]:
    norm, fc1, fc2 = (prefix + x for x in _PROJECTOR_NAMES[style])
    return [Rule(f"{meg}.{w}", (f"{hf}.{w}",)) for w in ("weight", "bias")
            for meg, hf in (("layer_norm", norm), ("encoder.linear_fc1", fc1),
                            ("encoder.linear_fc2", fc2))]


def internlm2_mapping(cfg: LLMConfig, hf_prefix: str = "language_model.model.",
                      output: str = "language_model.output.weight") -> Mapping:
    """InternLM2 (remote code) names; `wqkv` is copied, its rows are already megatron's order."""
    if cfg.qkv_bias:
        raise MappingError("InternLM2 layers have no qkv bias: set text.qkv_bias=False")
    p = hf_prefix + "layers.{i}."
    layer = [("self_attention.linear_qkv.layer_norm_weight", ("attention_norm.weight",), "copy"),
             ("self_attention.linear_qkv.weight", ("attention.wqkv.weight",), "copy"),
             ("self_attention.linear_proj.weight", ("attention.wo.weight",), "copy"),
             ("mlp.linear_fc1.layer_norm_weight", ("ffn_norm.weight",), "copy"),
             ("mlp.linear_fc1.weight", ("feed_forward.w1.weight", "feed_forward.w3.weight"),
              "concat"),
             ("mlp.linear_fc2.weight", ("feed_forward.w2.weight",), "copy")]
    rules = [Rule(_L + k, tuple(p + h for h in hf), t, per_layer=True) for k, hf, t in layer] + [
        Rule("embedding.word_embeddings.weight", (hf_prefix + "tok_embeddings.weight",),
             "pad_vocab"),
        Rule("decoder.final_layernorm.weight", (hf_prefix + "norm.weight",)),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", (output,), "pad_vocab"))
    dims = Dims(num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size,
                padded_vocab_size=cfg.padded_vocab_size)
    return Mapping(rules, dims)


def internvl_mapping(cfg: InternVLConfig, layout: str = "native_disk") -> Mapping:
    if layout not in LAYOUTS:
        raise MappingError(f"unknown InternVL layout {layout!r} (known: {', '.join(LAYOUTS)})")
    vision_prefix, projector_prefix, text_prefix, lm_head = LAYOUTS[layout]
    style = "chat" if layout == "chat" else "native"
    if style == "chat" and cfg.llm_arch == "internlm2":
        text = internlm2_mapping(cfg.text, text_prefix, "language_model.output.weight")
    else:
        text = qwen2_mapping(cfg.text, text_prefix, lm_head)
    v = cfg.vision
    vision = Mapping(vision_rules(v, vision_prefix, style),
                     Dims(num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
                          num_kv_heads=v.num_attention_heads, head_dim=v.head_dim,
                          padded_heads=v.padded_heads),
                     "vision_model.")
    projector = Mapping(projector_rules(projector_prefix, style), Dims(num_layers=1),
                        "vision_projection.")
    return text.with_prefix("language_model.") + vision + projector


def detect_layout(names: set[str]) -> str:
    """Which of LAYOUTS a checkpoint's tensor names are in."""
    for layout, (vision, projector, *_) in LAYOUTS.items():
        if any(n.startswith((vision, projector)) for n in names):
            return layout
    seen = sorted({n.split(".")[0] + "." for n in names})
    raise MappingError(
        "not an InternVL checkpoint: expected vision_model.* / mlp1.* (chat), vision_tower.* "
        f"(native on disk) or model.vision_tower.* (native in memory); saw prefixes {seen[:12]}")


# --- config.json -> InternVLConfig -------------------------------------------------------------


def config_from_hf(hf: dict, image_token_id: int | None = None) -> InternVLConfig:
    """An InternVLConfig from a config.json dict of either format.

    The chat format keeps the <IMG_CONTEXT> id in the tokenizer, not the config: pass it as
    `image_token_id` (see `image_token_id_from_tokenizer`); the native format's config has it.
    """
    model_type = hf.get("model_type")
    if model_type == "internvl_chat":
        return _from_chat(hf, image_token_id)
    if model_type == "internvl":
        return _from_native(hf, image_token_id)
    raise ConfigError(f"config model_type={model_type!r} is not InternVL "
                      "(expected internvl_chat or internvl)")


def image_token_id_from_tokenizer(tokenizer_config: dict) -> int:
    """The <IMG_CONTEXT> id from a tokenizer_config.json (where chat checkpoints keep it)."""
    for token_id, token in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        if token.get("content") == "<IMG_CONTEXT>":
            return int(token_id)
    raise ConfigError("tokenizer_config.json has no <IMG_CONTEXT> in added_tokens_decoder")


def _need(d: dict, key: str, where: str):
    if d.get(key) is None:
        raise ConfigError(f"{where}.{key} is missing")
    return d[key]


# our field -> its (key, default) in the chat and the native vision_config; the defaults are those
# of each format's config class (None: required)
_VISION_FIELDS = {
    "hidden_size": (("hidden_size", None), ("hidden_size", None)),
    "intermediate_size": (("intermediate_size", None), ("intermediate_size", None)),
    "num_hidden_layers": (("num_hidden_layers", None), ("num_hidden_layers", None)),
    "num_attention_heads": (("num_attention_heads", None), ("num_attention_heads", None)),
    "norm_type": (("norm_type", "rms_norm"), ("norm_type", "layer_norm")),
    "layer_norm_eps": (("layer_norm_eps", 1e-6), ("layer_norm_eps", 1e-6)),
    "qkv_bias": (("qkv_bias", False), ("attention_bias", False)),
    "qk_normalization": (("qk_normalization", False), ("use_qk_norm", False)),
    "image_size": (("image_size", None), ("image_size", 448)),
    "patch_size": (("patch_size", None), ("patch_size", 14)),
    "num_channels": (("num_channels", 3), ("num_channels", 3)),
    "hidden_act": (("hidden_act", "gelu"), ("hidden_act", "gelu")),
}


def _vision_config(vis: dict, style: str) -> InternVisionConfig:
    fields = {}
    for name, pair in _VISION_FIELDS.items():
        key, default = pair[style == "native"]
        fields[name] = (_need(vis, key, "vision_config") if default is None
                        else vis.get(key, default))
    for name in ("image_size", "patch_size"):
        fields[name] = _square(fields[name], name)
    return InternVisionConfig(**fields)


def _square(value, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"vision_config.{key}={list(value)} is not square (unsupported)")
        value = value[0]
    return int(value)


# LLMs of InternVL checkpoints we know and do not build, by chat architecture and native model_type
_UNSUPPORTED_LLMS = {
    "Qwen3MoeForCausalLM": "a Qwen3-MoE LLM (InternVL3.5-30B-A3B / 241B-A28B)",
    "qwen3_moe": "a Qwen3-MoE LLM (InternVL3.5-30B-A3B / 241B-A28B)",
    "GptOssForCausalLM": "a GPT-OSS LLM (InternVL3.5-GPT-OSS-20B-A4B)",
    "gpt_oss": "a GPT-OSS LLM (InternVL3.5-GPT-OSS-20B-A4B)",
}
_MOE_HINT = ("; InternVL's mixture-of-experts LLMs are not supported (only dense Qwen2, Qwen3 "
             "and InternLM2 LLMs: InternVL2.5, InternVL3, InternVL3.5-1B..38B)")


def _llm_arch(name, known: dict[str, str], where: str) -> str:
    if name in _UNSUPPORTED_LLMS:
        raise ConfigError(f"{where}={name!r} is {_UNSUPPORTED_LLMS[name]}{_MOE_HINT}")
    if name not in known:
        raise ConfigError(f"{where}={name!r} is not supported ({' or '.join(known)})")
    return known[name]


def _from_chat(hf: dict, image_token_id: int | None) -> InternVLConfig:
    llm, vis = _need(hf, "llm_config", "config"), _need(hf, "vision_config", "config")
    arch = (llm.get("architectures") or [None])[0]
    llm_arch = _llm_arch(arch, {"InternLM2ForCausalLM": "internlm2", "Qwen2ForCausalLM": "qwen2",
                                "Qwen3ForCausalLM": "qwen3"}, "llm_config.architectures")
    if hf.get("ps_version", "v1") != "v2":
        raise ConfigError(f"ps_version={hf.get('ps_version', 'v1')!r} is not supported (only v2)")
    if image_token_id is None:
        raise ConfigError("image_token_id is missing: internvl_chat configs do not store the "
                          "<IMG_CONTEXT> id; pass image_token_id_from_tokenizer(tokenizer_config)")
    vision = _vision_config(vis, "chat")
    forced = hf.get("force_image_size")
    if forced and forced != vision.image_size:
        raise ConfigError(f"force_image_size={forced} != vision_config.image_size="
                          f"{vision.image_size} is not supported")
    return InternVLConfig(text=_llm_config(llm, llm_arch, "llm_config"), vision=vision,
                          llm_arch=llm_arch, downsample_ratio=hf.get("downsample_ratio", 0.5),
                          image_token_id=image_token_id, select_layer=hf.get("select_layer", -1))


def _from_native(hf: dict, image_token_id: int | None) -> InternVLConfig:
    text, vis = _need(hf, "text_config", "config"), _need(hf, "vision_config", "config")
    llm_arch = _llm_arch(text.get("model_type"), {"qwen2": "qwen2", "llama": "internlm2",
                                                  "qwen3": "qwen3"}, "text_config.model_type")
    checks = [("vision_config.use_mean_pooling", vis.get("use_mean_pooling", True), True),
              ("vision_config.use_mask_token", vis.get("use_mask_token", False), False),
              ("vision_config.use_absolute_position_embeddings",
               vis.get("use_absolute_position_embeddings", True), True),
              ("vision_feature_select_strategy",
               hf.get("vision_feature_select_strategy", "default"), "default"),
              ("projector_hidden_act", hf.get("projector_hidden_act", "gelu"), "gelu")]
    for key, got, want in checks:
        if got != want:
            raise ConfigError(f"{key}={got!r} is not supported (only {want!r})")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ConfigError(f"vision_feature_layer={layer!r} is not supported (a single layer only)")
    vision = _vision_config(vis, "native")
    # transformers 5 ties on the top-level flag; configs without it fall back to the text one's
    tie = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    text = _llm_config(dict(text, tie_word_embeddings=tie), llm_arch, "text_config")
    return InternVLConfig(text=text, vision=vision, llm_arch=llm_arch,
                          downsample_ratio=hf.get("downsample_ratio", 0.5),
                          image_token_id=(image_token_id if image_token_id is not None
                                          else hf.get("image_token_id", 151667)),
                          select_layer=layer)


def _llm_config(d: dict, llm_arch: str, where: str) -> LLMConfig:
    """Qwen2, Qwen3, InternLM2 (remote code) or Llama (InternLM2 in transformers) text config."""
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}.hidden_act={d['hidden_act']!r} is not supported (only silu)")
    for key in ("bias", "attention_bias", "mlp_bias"):  # InternLM2, Llama, Qwen3 (q/k/v/o bias)
        if d.get(key):
            raise ConfigError(f"{where}.{key}=true is not supported")
    rope = dict(d.get("rope_parameters") or {}, **(d.get("rope_scaling") or {}))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "dynamic":
        warnings.warn(f"{where}: dynamic NTK rope scaling is not implemented; it only acts beyond "
                      f"max_position_embeddings={d.get('max_position_embeddings')}, so longer "
                      "sequences would not match the reference", stacklevel=4)
    elif kind != "default":
        raise ConfigError(f"{where}: rope scaling {kind!r} is not supported")
    fields = {"qwen3": True} if llm_arch == "qwen3" else {"qkv_bias": llm_arch == "qwen2"}
    cfg = llm_config_from_hf({k: v for k, v in d.items() if k != "rope_scaling"}, where, **fields)
    if cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads:
        cfg.head_dim = None  # the default, as the chat format leaves it
    return cfg
