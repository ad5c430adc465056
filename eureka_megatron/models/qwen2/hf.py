"""The Qwen2 / Qwen2.5 / Qwen3 decoder: HF names <-> our megatron LLM (`models/llm.py`).
Qwen3 drops the qkv bias and adds per-head q/k RMSNorm weights ([head_dim], copied).
Qwen3-MoE (and Qwen3-VL-MoE's LLM) replaces each MLP by a router (`mlp.gate.weight` [E, hidden] ->
megatron's `mlp.router.weight`) and E SwiGLU experts; megatron holds expert e of layer i as the
global tensors `mlp.experts.experts.linear_fc{1,2}.weight` at offsets (i, e), fc1 = [gate; up]
([2 x moe_intermediate_size, hidden]) and fc2 = down ([hidden, moe_intermediate_size]), whatever
the EP/ETP layout. HF stores the experts in one of three ways (`experts=`):

  per_expert  `mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj` [I, H], `down_proj` [H, I]:
              Qwen3-MoE hub checkpoints and what transformers' save_pretrained writes (it splits
              its fused tensors back), SGLang's names
  stacked     `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and `mlp.experts.down_proj`
              [E, H, I]: transformers >= 5 in memory (Qwen3-MoE and Qwen3-VL-MoE)
  stacked_t   the same names with each expert transposed, [E, H, 2I] and [E, I, H]:
              Qwen3-VL-MoE hub checkpoints on disk
The MLP's norm is megatron's `pre_mlp_layernorm.weight` in a MoE layer (no fused fc1 to carry it).

`hf_prefix` places the decoder inside a checkpoint: "model." for Qwen2ForCausalLM and for
Qwen2.5-VL's on-disk layout, "model.language_model." for the transformers >= 4.52 in-memory
layout, "language_model.model." for InternVL's original format. The output head lives outside the
decoder prefix, so it is given separately (`lm_head`; None when the embeddings are tied).
"""
from __future__ import annotations

from typing import Literal, get_args

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.mapping import Dims, Mapping, MappingError, Rule

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


ExpertLayout = Literal["per_expert", "stacked", "stacked_t"]
EXPERT_LAYOUTS: tuple[str, ...] = get_args(ExpertLayout)
_FC1, _FC2 = _L + "mlp.experts.experts.linear_fc1.weight", _L + "mlp.experts.experts.linear_fc2.weight"


def moe_rules(hf_prefix: str = "model.", experts: ExpertLayout = "per_expert") -> list[Rule]:
    """A MoE layer's MLP part: its norm, the router and the experts stored as `experts` says."""
    p = hf_prefix + "layers.{i}."
    rules = [Rule(_L + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",),
                  per_layer=True),
             Rule(_L + "mlp.router.weight", (p + "mlp.gate.weight",), per_layer=True)]
    if experts == "per_expert":
        e = p + "mlp.experts.{e}."
        return rules + [Rule(_FC1, (e + "gate_proj.weight", e + "up_proj.weight"), "concat",
                             per_expert=True),
                        Rule(_FC2, (e + "down_proj.weight",), per_expert=True)]
    if experts not in EXPERT_LAYOUTS:
        raise MappingError(f"unknown expert layout {experts!r}; known: {', '.join(EXPERT_LAYOUTS)}")
    how = "experts" if experts == "stacked" else "experts_t"
    return rules + [Rule(_FC1, (p + "mlp.experts.gate_up_proj",), how, per_expert=True),
                    Rule(_FC2, (p + "mlp.experts.down_proj",), how, per_expert=True)]


def qwen2_mapping(cfg: LLMConfig, hf_prefix: str = "model.", lm_head: str = "lm_head.weight",
                  experts: ExpertLayout = "per_expert") -> Mapping:
    """The decoder's mapping; `experts` is how a MoE checkpoint stores its experts (see above)."""
    dims = Dims(num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.kv_channels,
                vocab_size=cfg.vocab_size, padded_vocab_size=cfg.padded_vocab_size,
                num_experts=cfg.num_experts)
    rules = qwen2_rules(hf_prefix, None if cfg.tie_word_embeddings else lm_head)
    if not cfg.qkv_bias:
        rules = [r for r in rules if not r.megatron.endswith("linear_qkv.bias")]
    if cfg.is_moe:
        if cfg.shared_expert_intermediate_size:
            raise MappingError("no HF mapping for a shared expert (model.shared_expert_"
                               "intermediate_size > 0) yet")
        rules = [r for r in rules if not r.megatron.startswith(_L + "mlp.")]
        rules += moe_rules(hf_prefix, experts)
    if cfg.qk_norm:
        p = hf_prefix + "layers.{i}."
        rules += [Rule(_L + f"self_attention.{x}_layernorm.weight", (p + f"self_attn.{x}_norm.weight",),
                       per_layer=True) for x in "qk"]
    return Mapping(rules, dims)


QWEN3_MODEL_TYPES = ("qwen3", "qwen3_moe", "qwen3_vl_text", "qwen3_vl_moe_text")
# Qwen3-VL-MoE's router always renormalises its top-k weights (its config has no norm_topk_prob)
_ALWAYS_NORM_TOPK = ("qwen3_vl_moe", "qwen3_vl_moe_text")


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
    for k, v in moe_fields_from_hf(hf, where).items():
        fields.setdefault(k, v)
    return LLMConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings", 32768), **fields)


def moe_fields_from_hf(hf: dict, where: str = "config.json") -> dict:
    """LLMConfig's MoE fields from a Qwen3-MoE-style config (`num_experts`, or transformers'
    `num_local_experts`); {} for a dense one. Every layer must be a MoE layer (the hub configs':
    decoder_sparse_step 1, no mlp_only_layers); other layouts are refused naming the key. HF's
    `router_aux_loss_coef` is not read: the load-balancing loss is the run's choice
    (`model.moe_aux_loss_coeff`, off by default)."""
    experts = hf.get("num_experts", hf.get("num_local_experts")) or 0
    if not experts:
        return {}
    step = hf.get("decoder_sparse_step", 1)
    if step != 1:
        raise ConfigError(f"{where}: decoder_sparse_step={step} is not supported (dense layers "
                          "between MoE layers); only 1, every layer a MoE layer")
    if hf.get("mlp_only_layers"):
        raise ConfigError(f"{where}: mlp_only_layers={hf['mlp_only_layers']} is not supported "
                          "(dense layers among MoE layers); only []")
    if hf.get("shared_expert_intermediate_size"):
        raise ConfigError(f"{where}: shared_expert_intermediate_size="
                          f"{hf['shared_expert_intermediate_size']} is not supported (shared experts)")
    missing = [k for k in ("moe_intermediate_size", "num_experts_per_tok") if k not in hf]
    if missing:
        raise ConfigError(f"{where}: num_experts={experts} but no {', '.join(missing)}")
    norm = True if hf.get("model_type") in _ALWAYS_NORM_TOPK else bool(hf.get("norm_topk_prob", False))
    return dict(num_experts=int(experts), moe_intermediate_size=int(hf["moe_intermediate_size"]),
                num_experts_per_tok=int(hf["num_experts_per_tok"]), norm_topk_prob=norm)
