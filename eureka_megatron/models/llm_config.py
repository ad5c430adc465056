"""The Qwen2.5 / Qwen3-family decoder's architecture (every family's LLM) and the divisibility rules a
TP/PP layout must meet for it, checked before any rank starts (megatron asserts them deep inside
a rank). Torch-free: configs load and validate without importing the model."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from eureka_megatron.errors import ConfigError

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


@dataclass
class LLMConfig:
    """A Qwen2.5 / Qwen3-family decoder (GQA, RMSNorm, SwiGLU, RoPE; Qwen2.5: qkv bias; Qwen3: no
    bias, per-head q/k RMSNorm, head_dim set on its own). Names follow HF's config."""

    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's head_dim on q and k, before rope
    max_position_embeddings: int = 32768
    init_std: float = 0.02
    # The embedding/output rows are padded to a multiple of this (TP-independent, so checkpoints
    # reshard across TP); padded rows never enter the softmax.
    make_vocab_size_divisible_by: int = 128

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model (for tokens/s -> MFU arithmetic)."""
        h, kv = self.hidden_size, self.kv_channels
        q, k = self.num_attention_heads * kv, self.num_key_value_heads * kv
        attn = h * (q + 2 * k) + (q + 2 * k if self.qkv_bias else 0) + q * h
        attn += 2 * kv if self.qk_norm else 0
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * layer + h + emb * (1 if self.tie_word_embeddings else 2)


def validate_layout(model: LLMConfig, par: ParallelConfig) -> None:
    """The rules megatron asserts deep inside a rank for this model at `par` (heads, KV groups,
    layers per stage, padded vocab) and the layout's own (`par.validate()`), checked up front."""
    par.validate()
    tp, pp, vpp = par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline
    if model.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={model.num_attention_heads} is not "
                          f"divisible by parallel.tensor_parallel={tp}")
    if model.num_key_value_heads % tp:
        raise ConfigError(f"model.num_key_value_heads={model.num_key_value_heads} (KV groups) is "
                          f"not divisible by parallel.tensor_parallel={tp}")
    if model.num_attention_heads % model.num_key_value_heads:
        raise ConfigError("model.num_attention_heads must be a multiple of num_key_value_heads")
    first, last = par.first_stage_layers, par.last_stage_layers
    if first is not None or last is not None:
        _validate_uneven_split(model.num_hidden_layers, pp, vpp, first, last)
        return _validate_vocab(model, tp)
    stages = pp * (vpp or 1)
    if model.num_hidden_layers % stages:
        raise ConfigError(
            f"model.num_hidden_layers={model.num_hidden_layers} is not divisible by the "
            f"{stages} pipeline stages (PP={pp}" + (f" x VPP={vpp})" if vpp else ")"))
    _validate_vocab(model, tp)


def _validate_vocab(model: LLMConfig, tp: int) -> None:
    if model.padded_vocab_size % tp:
        raise ConfigError(f"padded vocab {model.padded_vocab_size} is not divisible by TP={tp}: "
                          "raise model.make_vocab_size_divisible_by")


def _validate_uneven_split(layers: int, pp: int, vpp: int | None, first: int | None,
                           last: int | None) -> None:
    if pp < 2:
        raise ConfigError("parallel.first_stage_layers / last_stage_layers need pipeline_parallel >= 2")
    if vpp:
        raise ConfigError("an uneven pipeline split (parallel.first_stage_layers / "
                          "last_stage_layers) cannot be combined with virtual_pipeline")
    for name, v in (("first_stage_layers", first), ("last_stage_layers", last)):
        if v is not None and v < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {v}")
    rest = layers - (first or 0) - (last or 0)
    stages = pp - (first is not None) - (last is not None)
    if rest < stages or (stages == 0 and rest) or (stages and rest % stages):
        raise ConfigError(
            f"cannot split {layers} LLM layers over {pp} pipeline stages with "
            f"first_stage_layers={first}, last_stage_layers={last}: the remaining {rest} layers "
            f"must divide evenly over the other {stages} stages")
