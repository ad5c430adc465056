"""Qwen2.5-VL: everything about the family in one place.

  config.py  the architecture          hf.py      config from HF, layouts, the mapping
  model.py   the megatron model        images.py  image preprocessing (transformers-exact)
and here: its chat markup, its batch inputs (3-D mrope positions) and the Family entry.
"""
from __future__ import annotations

import dataclasses

from eureka_megatron.models.family import ChatTokens, Family
from eureka_megatron.models.inputs import packed_params, padding_mask
from eureka_megatron.models.qwen2_5_vl import hf, images
from eureka_megatron.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig

QWEN_CHAT = ChatTokens("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>",
                       "<|vision_end|>")


def _build(cfg, par):
    from eureka_megatron.models.qwen2_5_vl.model import build_qwen2_5_vl_chunks  # megatron

    return build_qwen2_5_vl_chunks(cfg, par)


def prepare(cfg, inputs: dict) -> dict:
    """Positions [3, B, S] as transformers' get_rope_index gives them (padding skipped; in a
    packed row (`cu_seqlens`) every sequence starts again from 0); Qwen3-VL's too."""
    from eureka_megatron.models.qwen2_5_vl.model import mrope_position_ids  # megatron

    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    grid = inputs.get("image_grid_thw")
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs.get("pixel_values"),
            "image_grid_thw": grid,
            "position_ids": mrope_position_ids(ids, grid, cfg.image_token_id,
                                               cfg.vision.spatial_merge_size, attention_mask=mask,
                                               cu_seqlens=inputs.get("cu_seqlens"))}


def call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=padding_mask(mb["attention_mask"]),
                 pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"],
                 image_index=mb.get("image_index"), packed_seq_params=packed_params(mb))


FAMILY = Family(
    name="qwen2_5_vl", model_types=("qwen2_5_vl",),
    config_from_hf=lambda hf_config, directory=None: hf.config_from_hf(hf_config),
    detect_layout=hf.detect_layout, mapping=hf.qwen2_5_vl_mapping, build_chunks=_build,
    prepare=prepare, call=call,
    hf_model_type="qwen2_5_vl", hf_class="Qwen2_5_VLForConditionalGeneration", hf_layout="memory",
    chat=QWEN_CHAT, image_inputs=images.image_inputs,
    image_options_from_hf=images.image_options_from_hf,
    sglang_image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    # the merger is part of the tower: one switch
    trainable=lambda cfg, m: dataclasses.replace(cfg, freeze_vision=m.freeze_vision))

__all__ = ["FAMILY", "QWEN_CHAT", "Qwen25VLConfig", "Qwen25VisionConfig"]
