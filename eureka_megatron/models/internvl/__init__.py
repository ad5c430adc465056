"""InternVL2.5 / InternVL3 / InternVL3.5 (InternViT + pixel shuffle + mlp1 + a Qwen2, InternLM2
or dense Qwen3 LLM): everything about the family in one place.

  config.py  the architecture          hf.py      config from HF, the three layouts, the mapping
  model.py   the megatron model        images.py  dynamic tiling (transformers-exact)
and here: its chat markup, its batch inputs and the Family entry.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.family import ChatTokens, Family
from eureka_megatron.models.inputs import packed_params, padding_mask, text_prepare
from eureka_megatron.models.internvl import hf, images
from eureka_megatron.models.internvl.config import InternVisionConfig, InternVLConfig

INTERNVL_CHAT = ChatTokens("<|im_start|>", "<|im_end|>", "<img>", "<IMG_CONTEXT>", "</img>",
                           image_sep="\n")


def _config(hf_config: dict, directory: Path | None = None) -> InternVLConfig:
    """internvl_chat configs do not store the <IMG_CONTEXT> id; the tokenizer config does."""
    token = None
    tok = Path(directory) / "tokenizer_config.json" if directory else None
    if hf_config.get("model_type") == "internvl_chat":
        if tok is None or not tok.is_file():
            raise ConfigError(f"{tok or 'tokenizer_config.json'} is missing: internvl_chat "
                              "checkpoints keep the <IMG_CONTEXT> token id there")
        token = hf.image_token_id_from_tokenizer(json.loads(tok.read_text()))
    return hf.config_from_hf(hf_config, image_token_id=token)


def _build(cfg, par):
    from eureka_megatron.models.internvl.model import build_internvl_chunks  # megatron

    return build_internvl_chunks(cfg, par)


def _prepare(cfg, inputs: dict) -> dict:
    mb = text_prepare(cfg, inputs)
    mb["pixel_values"] = inputs.get("pixel_values")
    return mb


def _call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=padding_mask(mb["attention_mask"]),
                 pixel_values=mb["pixel_values"], image_index=mb.get("image_index"),
                 packed_seq_params=packed_params(mb))


FAMILY = Family(
    name="internvl", model_types=("internvl_chat", "internvl"), config_from_hf=_config,
    detect_layout=hf.detect_layout, mapping=hf.internvl_mapping, build_chunks=_build,
    prepare=_prepare, call=_call,
    hf_model_type="internvl", hf_class="InternVLForConditionalGeneration",
    hf_layout="native_memory", chat=INTERNVL_CHAT, image_inputs=images.image_inputs,
    image_options_from_hf=images.image_options_from_hf,
    check_images=images.check_images, sglang_image_options=images.sglang_image_options,
    tiles_images=True,
    sglang_image_placeholder="<image>",
    trainable=lambda cfg, m: dataclasses.replace(cfg, freeze_vision=m.freeze_vision,
                                                 freeze_projector=m.freeze_projector))

__all__ = ["FAMILY", "INTERNVL_CHAT", "InternVLConfig", "InternVisionConfig"]
