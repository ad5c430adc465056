"""InternVL's architecture: InternViT, the pixel shuffle, the mlp1 projector (HF's names)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm_config import LLMConfig


@dataclass
class InternVisionConfig:
    """InternViT (300M: LayerNorm + qkv bias; 6B: RMSNorm + full-width qk-norm); HF's names."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    image_size: int = 56
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: Literal["gelu"] = "gelu"
    # Heads are zero-padded to a multiple of this (InternViT-6B: 25 -> 32), which is exact and lets
    # the tower shard at every TP dividing the multiple; TP-independent, so checkpoints reshard.
    head_pad_multiple: int = 8

    def __post_init__(self):
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ConfigError(f"vision.norm_type must be layer_norm or rms_norm, "
                              f"got {self.norm_type!r}")
        if self.hidden_act != "gelu":
            raise ConfigError(f"vision.hidden_act {self.hidden_act!r} is not supported (only gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision.hidden_size={self.hidden_size} is not divisible by "
                              f"vision.num_attention_heads={self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_heads(self) -> int:
        m = self.head_pad_multiple
        return int(math.ceil(self.num_attention_heads / m) * m)


LLM_ARCHS = ("qwen2", "internlm2", "qwen3")


@dataclass
class InternVLConfig:
    """InternVL2.5 / InternVL3 / InternVL3.5: InternViT, pixel shuffle, the mlp1 projector, a Qwen2,
    InternLM2 or (InternVL3.5) dense Qwen3 LLM. InternLM2.5 is an `LLMConfig` with qkv_bias=False;
    Qwen3 one with qk_norm=True, qkv_bias=False and its own head_dim."""

    text: LLMConfig = field(default_factory=LLMConfig)
    vision: InternVisionConfig = field(default_factory=InternVisionConfig)
    # the LLM's parameter names in the chat layout (qwen3: qwen2's plus self_attn.q_norm / k_norm)
    llm_arch: Literal["qwen2", "internlm2", "qwen3"] = "qwen2"
    downsample_ratio: float = 0.5
    image_token_id: int = 151667  # <IMG_CONTEXT> (InternVL2.5/3; InternVL3.5's Qwen3 tokenizer: 151671)
    select_layer: int = -1
    freeze_vision: bool = True  # the tower
    freeze_projector: bool | None = None  # the mlp1 projector; None: as freeze_vision

    def __post_init__(self):
        if self.llm_arch not in LLM_ARCHS:
            raise ConfigError(f"llm_arch must be one of {', '.join(LLM_ARCHS)}, "
                              f"got {self.llm_arch!r}")
        if self.llm_arch == "qwen3" and not self.text.qk_norm:
            raise ConfigError("llm_arch qwen3 (InternVL3.5) needs text.qk_norm=True: Qwen3 "
                              "normalises each head's q and k")
        if not 0 < self.downsample_ratio <= 1 or (1 / self.downsample_ratio) % 1:
            raise ConfigError(f"downsample_ratio={self.downsample_ratio} must be 1 / an integer")
        n = self.vision.num_hidden_layers
        if not -n - 1 <= self.select_layer <= n:
            raise ConfigError(f"select_layer={self.select_layer} is outside the vision tower's "
                              f"hidden states (embeddings + {n} layers)")

    @property
    def shuffle_factor(self) -> int:
        """Patches merged per side by the pixel shuffle (2 for downsample_ratio 0.5)."""
        return round(1 / self.downsample_ratio)
