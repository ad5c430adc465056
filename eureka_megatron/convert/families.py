"""The model families the converters and `forward` know, keyed by HF `model_type`.

A family ties together what one model needs end to end: reading its HF config, telling its
on-disk naming layouts apart, its declarative mapping, building its megatron chunks, and the
call that runs a batch through a chunk. Adding a model means adding one entry here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from eureka_megatron.config import ConfigError
from eureka_megatron.convert import internvl, qwen2_5_vl
from eureka_megatron.convert.qwen2 import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.llm import build_llm_chunks


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict, Path | None], Any]  # (config.json, dir with tokenizer files)
    detect_layout: Callable[[set[str]], str]
    mapping: Callable[[Any, str], Any]          # (cfg, layout) -> Mapping
    build_chunks: Callable[[Any, Any], list]    # (cfg, ParallelConfig) -> chunks
    prepare: Callable[[Any, dict], dict]        # (cfg, HF processor output) -> micro-batch
    call: Callable[[Any, torch.nn.Module, dict], torch.Tensor]  # (cfg, chunk, mb) -> output


# --- Qwen2 / Qwen2.5 (text) -------------------------------------------------------------------

def _qwen2_config(hf: dict, directory: Path | None = None):
    return llm_config_from_hf(hf)


def _qwen2_mapping(cfg, layout: str):
    return qwen2_mapping(cfg, "model.", "lm_head.weight")


def _qwen2_build(cfg, par):
    return build_llm_chunks(cfg, par)


def _text_prepare(cfg, inputs: dict) -> dict:
    ids = inputs["input_ids"]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    if "attention_mask" in inputs:  # left padding: positions count real tokens only
        pos = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": inputs.get("attention_mask")}


def _padding_mask(attention_mask):
    """HF [B, S] keep-mask -> megatron [B, 1, S, S] causal + padding mask (True = masked)."""
    if attention_mask is None:
        return None
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    pad = ~attention_mask.bool()[:, None, None, :]
    return causal[None, None] | pad


def _text_call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=_padding_mask(mb["attention_mask"]))


# --- Qwen2.5-VL ---------------------------------------------------------------------------------

def _qwen2_5_vl_config(hf: dict, directory: Path | None = None):
    return qwen2_5_vl.config_from_hf(hf)


def _qwen2_5_vl_layout(names):
    return qwen2_5_vl.detect_layout(names)


def _qwen2_5_vl_mapping(cfg, layout):
    return qwen2_5_vl.qwen2_5_vl_mapping(cfg, layout)


def _qwen2_5_vl_build(cfg, par):
    from eureka_megatron.models.qwen2_5_vl import build_qwen2_5_vl_chunks

    return build_qwen2_5_vl_chunks(cfg, par)


def _qwen2_5_vl_prepare(cfg, inputs: dict) -> dict:
    from eureka_megatron.models.qwen2_5_vl import mrope_position_ids

    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    grid = inputs.get("image_grid_thw")
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs.get("pixel_values"),
            "image_grid_thw": grid,
            "position_ids": mrope_position_ids(ids, grid, cfg.image_token_id,
                                               cfg.vision.spatial_merge_size, attention_mask=mask)}


def _qwen2_5_vl_call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=_padding_mask(mb["attention_mask"]),
                 pixel_values=mb["pixel_values"], image_grid_thw=mb["image_grid_thw"],
                 image_index=mb.get("image_index"))


# --- InternVL -----------------------------------------------------------------------------------

def _internvl_config(hf: dict, directory: Path | None = None):
    """internvl_chat configs do not store the <IMG_CONTEXT> id; the tokenizer config does."""
    token = None
    tok = Path(directory) / "tokenizer_config.json" if directory else None
    if hf.get("model_type") == "internvl_chat":
        if tok is None or not tok.is_file():
            raise ConfigError(f"{tok or 'tokenizer_config.json'} is missing: internvl_chat "
                              "checkpoints keep the <IMG_CONTEXT> token id there")
        token = internvl.image_token_id_from_tokenizer(json.loads(tok.read_text()))
    return internvl.config_from_hf(hf, image_token_id=token)


def _internvl_layout(names):
    return internvl.detect_layout(names)


def _internvl_mapping(cfg, layout):
    return internvl.internvl_mapping(cfg, layout)


def _internvl_build(cfg, par):
    from eureka_megatron.models.internvl import build_internvl_chunks

    return build_internvl_chunks(cfg, par)


def _internvl_prepare(cfg, inputs: dict) -> dict:
    mb = _text_prepare(cfg, inputs)
    mb["pixel_values"] = inputs.get("pixel_values")
    return mb


def _internvl_call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=_padding_mask(mb["attention_mask"]),
                 pixel_values=mb["pixel_values"], image_index=mb.get("image_index"))


FAMILIES = [
    Family("qwen2", ("qwen2",), _qwen2_config, lambda names: "causal_lm", _qwen2_mapping,
           _qwen2_build, _text_prepare, _text_call),
    Family("qwen2_5_vl", ("qwen2_5_vl",), _qwen2_5_vl_config, _qwen2_5_vl_layout,
           _qwen2_5_vl_mapping, _qwen2_5_vl_build, _qwen2_5_vl_prepare, _qwen2_5_vl_call),
    Family("internvl", ("internvl_chat", "internvl"), _internvl_config, _internvl_layout,
           _internvl_mapping, _internvl_build, _internvl_prepare, _internvl_call),
]


def supported_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_for(hf_config: dict, where: str = "config.json") -> Family:
    model_type = hf_config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ConfigError(f"{where}: model_type {model_type!r} is not supported; supported: "
                      f"{', '.join(supported_model_types())}")
