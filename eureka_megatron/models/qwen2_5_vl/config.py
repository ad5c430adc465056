"""Qwen2.5-VL's architecture: the vision tower and the whole model (HF's names)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from eureka_megatron.models.llm_config import LLMConfig


@dataclass
class Qwen25VisionConfig:
    """Qwen2.5-VL's vision tower; names follow HF's `vision_config`."""

    depth: int = 2
    hidden_size: int = 32
    intermediate_size: int = 64
    num_heads: int = 2
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 56
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [1])
    out_hidden_size: int = 64  # the LLM's hidden size
    rope_theta: float = 10000.0
    # The MLP width is zero-padded to a multiple of this (3420 -> 3456), which is exact and lets
    # the tower shard at every TP dividing the multiple; TP-independent, so checkpoints reshard.
    intermediate_pad_multiple: int = 128

    @property
    def padded_intermediate_size(self) -> int:
        m = self.intermediate_pad_multiple
        return int(math.ceil(self.intermediate_size / m) * m)


@dataclass
class Qwen25VLConfig:
    text: LLMConfig = field(default_factory=LLMConfig)
    vision: Qwen25VisionConfig = field(default_factory=Qwen25VisionConfig)
    mrope_section: list[int] = field(default_factory=lambda: [2, 3, 3])
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    freeze_vision: bool = True
