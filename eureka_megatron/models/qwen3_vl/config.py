"""Qwen3-VL's architecture (HF's names) and the layout rules its DeepStack adds. Torch-free.

The LLM is any `LLMConfig` (`cfg.text`): Qwen3's dense decoder here; the Qwen3-VL-MoE family
reuses this config, the tower, DeepStack and the interleaved mrope with a MoE `LLMConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm_config import LLMConfig, validate_layout

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


@dataclass
class Qwen3VLVisionConfig:
    """Qwen3-VL's vision tower; names follow HF's `vision_config`."""

    depth: int = 3
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 2
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 64  # the LLM's hidden size
    # the learned position table: a square grid, bilinearly resampled to each image's patch grid
    num_position_embeddings: int = 16
    # blocks whose outputs also go through their own merger into the first LLM layers (DeepStack)
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [0, 1])
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # HF hard-codes it (blocks and mergers)
    # The MLP width is zero-padded to a multiple of this (4304 -> 4352): exact, and the tower then
    # shards at every TP dividing the multiple; TP-independent, so checkpoints reshard.
    intermediate_pad_multiple: int = 128

    @property
    def padded_intermediate_size(self) -> int:
        m = self.intermediate_pad_multiple
        return int(math.ceil(self.intermediate_size / m) * m)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclass
class Qwen3VLConfig:
    text: LLMConfig = field(default_factory=lambda: LLMConfig(qk_norm=True, qkv_bias=False))
    vision: Qwen3VLVisionConfig = field(default_factory=Qwen3VLVisionConfig)
    # rope channels per axis (T, H, W), interleaved: channel i of head_dim / 2 takes H when
    # i % 3 == 1 and i < 3 * H-section, W when i % 3 == 2 and i < 3 * W-section, else T
    mrope_section: list[int] = field(default_factory=lambda: [24, 20, 20])
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    freeze_vision: bool = True


def first_chunk_layers(layers: int, par: ParallelConfig) -> int:
    """LLM layers in the first pipeline chunk (the one holding the vision tower), as megatron
    splits them: parallel.first_stage_layers, else an even share of what the last stage leaves."""
    pp, vpp = par.pipeline_parallel, par.virtual_pipeline
    if pp <= 1:
        return layers
    if par.first_stage_layers is not None:
        return par.first_stage_layers
    if par.last_stage_layers is not None:
        return (layers - par.last_stage_layers) // (pp - 1)
    return layers // (pp * (vpp or 1))


def validate_qwen3_vl_layout(cfg: Qwen3VLConfig, par: ParallelConfig) -> None:
    """The LLM's rules (`validate_layout`), the tower's heads vs TP, and DeepStack's: its
    features are added after the first len(deepstack_visual_indexes) LLM layers, which must sit
    in the first pipeline chunk beside the tower. Checked before any rank starts."""
    validate_layout(cfg.text, par)
    v, tp = cfg.vision, par.tensor_parallel
    if v.num_heads % tp:
        raise ConfigError(f"the vision tower's {v.num_heads} heads are not divisible by "
                          f"parallel.tensor_parallel={tp}")
    if v.padded_intermediate_size % tp:
        raise ConfigError(f"the vision MLP width {v.padded_intermediate_size} is not divisible by "
                          f"parallel.tensor_parallel={tp}")
    deep = len(v.deepstack_visual_indexes)
    first = first_chunk_layers(cfg.text.num_hidden_layers, par)
    if first < deep:
        raise ConfigError(
            f"Qwen3-VL adds DeepStack features after its first {deep} LLM layers, which must be on "
            f"the first pipeline stage with the vision tower, but this layout puts {first} there "
            f"(parallel.pipeline_parallel={par.pipeline_parallel}, "
            f"first_stage_layers={par.first_stage_layers}, "
            f"virtual_pipeline={par.virtual_pipeline}): set parallel.first_stage_layers >= {deep} "
            "or use fewer pipeline stages")
