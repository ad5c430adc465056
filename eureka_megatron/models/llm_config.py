"""The Qwen2.5 / Qwen3-family decoder's architecture (every family's LLM, dense or Mixture-of-Experts)
and the divisibility rules a TP/PP/EP layout must meet for it, checked before any rank starts
(megatron asserts them deep inside a rank). Torch-free: configs load and validate without importing
the model."""
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
    bias, per-head q/k RMSNorm, head_dim set on its own). Names follow HF's config.

    Mixture-of-Experts (Qwen3-MoE, Qwen3-VL-MoE's LLM) when `num_experts` > 0: every layer's MLP is
    `num_experts` SwiGLU experts of width `moe_intermediate_size`; a linear router (no bias)
    scores them, softmax over all experts, the top `num_experts_per_tok` are kept and, with
    `norm_topk_prob`, renormalised to sum to 1 (`intermediate_size` is then unused).
    `moe_aux_loss_coeff` is the switch-transformer load-balancing loss weight of the *run*
    (`model.moe_aux_loss_coeff` in the run config), 0 (off) by default as RL frameworks do; an HF
    config's `router_aux_loss_coef` is never read into it.
    """

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
    # Mixture-of-Experts (0 experts: dense)
    num_experts: int = 0
    moe_intermediate_size: int | None = None  # default intermediate_size
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0  # a gated shared expert beside the routed ones (0: none)
    moe_aux_loss_coeff: float = 0.0  # load-balancing loss weight; 0: megatron's routing without it

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / m) * m)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_ffn(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def num_parameters(self) -> int:
        """Parameter count of the unpadded model, every expert included (memory, checkpoints)."""
        return self._count(self.num_experts)

    def num_active_parameters(self) -> int:
        """Parameters one token passes through: the router and its `num_experts_per_tok` experts
        in place of all of them (tokens/s -> MFU arithmetic); the dense count for dense models."""
        return self._count(self.num_experts_per_tok)

    def _count(self, experts: int) -> int:
        h, kv = self.hidden_size, self.kv_channels
        q, k = self.num_attention_heads * kv, self.num_key_value_heads * kv
        attn = h * (q + 2 * k) + (q + 2 * k if self.qkv_bias else 0) + q * h
        attn += 2 * kv if self.qk_norm else 0
        if self.is_moe:
            mlp = self.num_experts * h + experts * 3 * h * self.expert_ffn  # router + experts
            if self.shared_expert_intermediate_size:  # the shared expert and its 1-wide gate
                mlp += 3 * h * self.shared_expert_intermediate_size + h
        else:
            mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * layer + h + emb * (1 if self.tie_word_embeddings else 2)


def validate_layout(model: LLMConfig, par: ParallelConfig) -> None:
    """The rules megatron asserts deep inside a rank for this model at `par` (heads, KV groups,
    layers per stage, padded vocab) and the layout's own (`par.validate()`), checked up front."""
    par.validate()
    _validate_moe(model, par)
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


def _validate_moe(model: LLMConfig, par: ParallelConfig) -> None:
    """The experts' own rules and megatron's for their layout (EP, ETP), naming the keys."""
    ep, etp, tp = par.expert_parallel, par.etp, par.tensor_parallel
    e = model.num_experts
    if isinstance(e, bool) or e < 0:
        raise ConfigError(f"model.num_experts must be >= 0 (0: a dense model), got {e!r}")
    if not model.is_moe:
        if ep > 1:
            raise ConfigError(f"parallel.expert_parallel={ep} needs a Mixture-of-Experts model "
                              "(model.num_experts > 0); this model is dense")
        if model.shared_expert_intermediate_size:
            raise ConfigError("model.shared_expert_intermediate_size needs model.num_experts > 0")
        return
    if not 1 <= model.num_experts_per_tok <= e:
        raise ConfigError(f"model.num_experts_per_tok={model.num_experts_per_tok} must be in "
                          f"[1, model.num_experts={e}]")
    if model.expert_ffn < 1:
        raise ConfigError(f"model.moe_intermediate_size={model.moe_intermediate_size} must be >= 1")
    if model.moe_aux_loss_coeff < 0:
        raise ConfigError(f"model.moe_aux_loss_coeff={model.moe_aux_loss_coeff} must be >= 0")
    if e % ep:
        raise ConfigError(f"model.num_experts={e} is not divisible by parallel.expert_parallel={ep}")
    if model.expert_ffn % etp:
        raise ConfigError(f"model.moe_intermediate_size={model.expert_ffn} is not divisible by the "
                          f"expert tensor parallel size {etp} (parallel.expert_tensor_parallel, "
                          "default parallel.tensor_parallel)")
    if model.shared_expert_intermediate_size % tp:
        raise ConfigError(f"model.shared_expert_intermediate_size="
                          f"{model.shared_expert_intermediate_size} is not divisible by "
                          f"parallel.tensor_parallel={tp}")
    if tp > 1 and not par.sequence_parallel:
        raise ConfigError(f"a Mixture-of-Experts model at parallel.tensor_parallel={tp} needs "
                          "parallel.sequence_parallel=true (megatron's MoE layer refuses to train "
                          "with TP but without sequence parallelism)")


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
