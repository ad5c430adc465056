"""Qwen3-VL (dense): everything about the family in one place.

  config.py  the architecture, layout rules   hf.py      config from HF, layouts, the mapping
  model.py   the megatron model (tower, DeepStack, interleaved mrope)
  images.py  image preprocessing (transformers-exact)
and here: its batch inputs (3-D mrope positions) and the Family entry. The chat markup is
Qwen2.5-VL's (<|vision_start|><|image_pad|>..<|vision_end|>).
"""
from __future__ import annotations

import dataclasses

from eureka_megatron.models.family import Family
from eureka_megatron.models.qwen2_5_vl import QWEN_CHAT, call, prepare  # the same batch inputs
from eureka_megatron.models.qwen3_vl import hf, images
from eureka_megatron.models.qwen3_vl.config import (Qwen3VLConfig, Qwen3VLVisionConfig,
                                                    validate_qwen3_vl_layout)


def _build(cfg, par):
    from eureka_megatron.models.qwen3_vl.model import build_qwen3_vl_chunks  # megatron

    return build_qwen3_vl_chunks(cfg, par)


FAMILY = Family(
    name="qwen3_vl", model_types=("qwen3_vl",),
    config_from_hf=lambda hf_config, directory=None: hf.config_from_hf(hf_config),
    detect_layout=hf.detect_layout, mapping=hf.qwen3_vl_mapping, build_chunks=_build,
    prepare=prepare, call=call,
    hf_model_type="qwen3_vl", hf_class="Qwen3VLForConditionalGeneration", hf_layout="memory",
    chat=QWEN_CHAT, image_inputs=images.image_inputs,
    image_options_from_hf=images.image_options_from_hf, check_layout=validate_qwen3_vl_layout,
    sglang_image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    # the mergers (main and DeepStack) are part of the tower: one switch
    trainable=lambda cfg, m: dataclasses.replace(cfg, freeze_vision=m.freeze_vision))

__all__ = ["FAMILY", "Qwen3VLConfig", "Qwen3VLVisionConfig", "call", "prepare", "validate_qwen3_vl_layout"]
