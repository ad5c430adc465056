"""Qwen3-VL-MoE (Qwen3VLMoeForConditionalGeneration: Qwen3-VL-30B-A3B, -235B-A22B): Qwen3-VL's
tower, DeepStack, interleaved mrope, preprocessing, batch inputs and layout rules (`models/
qwen3_vl/`, reused as they are) with a Qwen3-MoE LLM (every MLP a softmax router over E SwiGLU
experts, top-k, always renormalised; `models/llm.py` builds it from the MoE `LLMConfig`).

Only the experts' naming is its own. Both layouts name a layer's experts with two stacked tensors,
`model.language_model.layers.{i}.mlp.experts.gate_up_proj` and `.down_proj`, but hold them
differently (transformers 5.25; `mapping.py`'s expert layouts):

  memory  "stacked": [E, 2I, H] (gate rows, then up) and [E, H, I]. transformers' model in memory
          and what its `save_pretrained` writes (its Qwen3-VL-MoE conversion transposes only a
          tensor whose shape differs from the parameter's, so saving writes the memory layout);
          the HF engine's sync.
  disk    "stacked_t": each expert transposed, [E, H, 2I] and [E, I, H]. The hub checkpoints
          (what transformers transposes on load), SGLang's loader, our exports by default.

The names being equal, `detect_layout` tells them by shape (`TensorNames`: a checkpoint's names
carry their shapes): memory has gate_up [E, 2I, H] with down [E, H, I], disk [E, H, 2I] with
[E, I, H]. Taken together the two never fit both layouts (that would need H == 2H), so the
detection is exact even where 2I == H makes gate_up square.
"""
from __future__ import annotations

import dataclasses

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.family import Family
from eureka_megatron.models.mapping import MappingError
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.qwen3_vl import FAMILY as QWEN3_VL
from eureka_megatron.models.qwen3_vl import hf as q3hf
from eureka_megatron.models.qwen3_vl.config import Qwen3VLConfig

EXPERTS = {"memory": "stacked", "disk": "stacked_t"}  # layout -> expert layout (qwen2/hf.py)
_GATE_UP, _DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def _text_config_from_hf(text: dict, where: str, **fields):
    """Qwen3-VL-MoE's text config: its router always renormalises the top-k weights (the
    config has no norm_topk_prob), whatever text_config.model_type says or omits."""
    llm = llm_config_from_hf({**text, "model_type": "qwen3_vl_moe_text"}, where, **fields)
    if not llm.is_moe:
        raise ConfigError(f"{where}: a qwen3_vl_moe model needs num_experts (or "
                          "num_local_experts) > 0 in text_config")
    return llm


def config_from_hf(hf_config: dict, directory=None) -> Qwen3VLConfig:
    """Our config from a Qwen3-VL-MoE config.json (the hub's `text_config` + `vision_config`)."""
    return q3hf.config_from_hf(hf_config, text_config_from_hf=_text_config_from_hf)


def mapping(cfg: Qwen3VLConfig, layout: str):
    if layout not in EXPERTS:
        raise MappingError(f"unknown Qwen3-VL-MoE layout {layout!r}; known: {', '.join(EXPERTS)}")
    experts = EXPERTS[layout]
    return q3hf.qwen3_vl_mapping(
        cfg, layout, text_mapping=lambda text, prefix, lm_head: qwen2_mapping(
            text, prefix, lm_head, experts=experts))


def _shape_reader(names):
    """name -> shape: from a `TensorNames` (a checkpoint's, or `TensorNames.of(state_dict)`) or
    a dict of tensors; None for plain names."""
    if isinstance(names, dict):
        return lambda n: tuple(names[n].shape)
    shape = getattr(names, "shape", None)
    if callable(shape):
        return shape
    return None


def detect_layout(names) -> str:
    """"memory" or "disk" (see above), from the shapes of layer 0's stacked experts."""
    q3hf.detect_layout(names)  # a Qwen3-VL state dict at all
    gate_up = q3hf.TEXT_PREFIX + "layers.0." + _GATE_UP
    down = q3hf.TEXT_PREFIX + "layers.0." + _DOWN
    if gate_up not in names or down not in names:
        raise MappingError(f"not a Qwen3-VL-MoE state dict: no {gate_up} / {down} (stacked "
                           "experts); per-expert tensors are not a Qwen3-VL-MoE layout")
    shape = _shape_reader(names)
    if shape is None or shape(gate_up) is None:
        raise MappingError("Qwen3-VL-MoE's two layouts share their names: telling them apart "
                           "needs the tensors' shapes (pass TensorNames, e.g. HFCheckpoint.names)")
    g, d = shape(gate_up), shape(down)
    if len(g) == 3 and len(d) == 3 and g[0] == d[0]:
        if g[1] == 2 * d[2] and g[2] == d[1]:
            return "memory"
        if g[2] == 2 * d[1] and g[1] == d[2]:
            return "disk"
    raise MappingError(f"{gate_up} {g} and {down} {d} are neither transformers' in-memory experts "
                       "([E, 2I, H], [E, H, I]) nor the hub's ([E, H, 2I], [E, I, H])")


def trainable(cfg: Qwen3VLConfig, model_section) -> Qwen3VLConfig:
    """The tower switch (`model.freeze_vision`) and the run's load-balancing loss weight
    (`model.moe_aux_loss_coeff`, 0 = off) on the LLM."""
    cfg = QWEN3_VL.trainable(cfg, model_section)
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, moe_aux_loss_coeff=float(
        getattr(model_section, "moe_aux_loss_coeff", 0.0))))


FAMILY = dataclasses.replace(
    QWEN3_VL, name="qwen3_vl_moe", model_types=("qwen3_vl_moe",),
    config_from_hf=config_from_hf, detect_layout=detect_layout, mapping=mapping,
    hf_model_type="qwen3_vl_moe", hf_class="Qwen3VLMoeForConditionalGeneration",
    hf_layout="memory", trainable=trainable)

__all__ = ["FAMILY", "config_from_hf", "detect_layout", "mapping"]
