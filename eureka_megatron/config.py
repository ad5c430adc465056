"""Typed configuration: dataclasses, loaded from YAML plus dotted `key=value` overrides.

Everything is validated at load time, before any rank starts, so a bad layout or a typo fails in
one clear line instead of minutes later on rank 3.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eureka_megatron.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the offending key."""


@dataclass
class LLMConfig:
    """A Qwen2.5-family decoder (GQA, qkv bias, RMSNorm, SwiGLU, RoPE). Names follow HF's config."""

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
        mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        return self.num_hidden_layers * layer + h + emb * (1 if self.tie_word_embeddings else 2)


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


@dataclass
class InternVisionConfig:
    """InternViT (300M: LayerNorm + qkv bias; 6B: RMSNorm + full-width qk-norm); HF's names."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    norm_type: str = "layer_norm"  # layer_norm | rms_norm
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    qk_normalization: bool = False
    image_size: int = 56
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "gelu"
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


@dataclass
class InternVLConfig:
    """InternVL2.5 / InternVL3: InternViT, pixel shuffle, the mlp1 projector, a Qwen2 or InternLM2
    LLM (InternLM2.5 is an `LLMConfig` with qkv_bias=False)."""

    text: LLMConfig = field(default_factory=LLMConfig)
    vision: InternVisionConfig = field(default_factory=InternVisionConfig)
    llm_arch: str = "qwen2"  # qwen2 | internlm2: the LLM's parameter names in the chat layout
    downsample_ratio: float = 0.5
    image_token_id: int = 151667  # <IMG_CONTEXT>
    select_layer: int = -1
    freeze_vision: bool = True  # the tower
    freeze_projector: bool | None = None  # the mlp1 projector; None: as freeze_vision

    def __post_init__(self):
        if self.llm_arch not in ("qwen2", "internlm2"):
            raise ConfigError(f"llm_arch must be qwen2 or internlm2, got {self.llm_arch!r}")
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


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None
    nproc: int = 1  # world size; DP = nproc / (TP * PP)
    bf16: bool = False  # Float16Module + bf16 params (GPU); CPU runs default to fp32
    # torch intra-op threads per rank; null: the launcher's share (CPU cores / local ranks)
    threads: int | None = None
    # Uneven LLM split: decoder layers on the first / last pipeline stage (the rest are spread
    # evenly); e.g. fewer on the first stage, which also runs the vision tower. None: even.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None

    @property
    def dp(self) -> int:
        return self.nproc // (self.tensor_parallel * self.pipeline_parallel)

    def describe(self) -> str:
        vpp = f" x VPP{self.virtual_pipeline}" if self.virtual_pipeline else ""
        return (f"TP{self.tensor_parallel} x PP{self.pipeline_parallel}{vpp} x DP{self.dp} = "
                f"{self.nproc} ranks")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    decay_steps: int | None = None  # default: train.steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    steps: int = 20
    seq_length: int = 64
    micro_batch_size: int = 2
    global_batch_size: int = 8  # sequences per optimizer step, across DP and micro-batches
    seed: int = 1234
    log_interval: int = 1


@dataclass
class CheckpointConfig:
    dir: str | None = None
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 3
    load: str | None = None  # a run dir (uses its `latest`) or one step_* dir


ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce++")
POLICY_LOSSES = ("ppo", "gspo", "cpgd")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
ROLLOUT_IS_MODES = ("off", "token", "sequence", "mask")


@dataclass
class AlgoConfig:
    """The RL algorithm: advantage estimator, online filter, policy loss, KL, entropy, shaping.

    Defaults are MM-Eureka-Qwen's recipe (GRPO, online filter [0.1, 0.9], eps 0.2, ratio cap 3,
    no KL) with a token-mean loss; see docs in `eureka_megatron/algo/`.
    """

    estimator: str = "grpo"  # grpo | dr_grpo | rloo | reinforce++
    whiten: bool = False  # whiten advantages over the batch's tokens (always for reinforce++)
    grpo_eps: float = 1e-6  # grpo's (r - mean) / (std + eps); MM-Eureka's group_norm: 1e-9
    # CPGD's clip-filter-like group weight min(G / (G - #zero-variance groups), cap); null: off
    clip_filter_like_cap: float | None = None
    online_filter: bool = True  # keep groups whose mean accuracy lies in [filter_low, filter_high]
    filter_low: float = 0.1
    filter_high: float = 0.9
    loss: str = "ppo"  # ppo (clip, clip-higher, dual clip) | gspo (sequence ratio) | cpgd
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: DAPO's clip-higher (e.g. 0.28)
    dual_clip: float | None = 3.0  # ppo/gspo: cap -A*ratio for A < 0 (MM-Eureka's ratio cap 3)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    kl_coef: float = 0.0
    kl_type: str = "k3"  # k1 | k2 | k3
    kl_in: str = "loss"  # loss: a loss term | reward: subtracted from each sequence's reward
    entropy_coef: float = 0.0
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens; 0 = off
    overlong_factor: float = 1.0
    cpgd_drift_coef: float = 0.01  # CPGD policy-drift weight and ratio clip (MM-Eureka defaults)
    cpgd_drift_clip: float = 2.0
    # train/rollout mismatch correction with the engine's log-probs (algo/mismatch.py):
    # off | token | sequence | mask, capped at rollout_is_cap
    rollout_is: str = "off"
    rollout_is_cap: float = 2.0

    def validate(self) -> "AlgoConfig":
        for name, value, allowed in (("estimator", self.estimator, ESTIMATORS),
                                     ("loss", self.loss, POLICY_LOSSES),
                                     ("agg", self.agg, LOSS_AGGS),
                                     ("kl_type", self.kl_type, KL_ESTIMATORS),
                                     ("kl_in", self.kl_in, ("loss", "reward")),
                                     ("rollout_is", self.rollout_is, ROLLOUT_IS_MODES)):
            if value not in allowed:
                raise ConfigError(f"algo.{name}={value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.filter_low <= self.filter_high <= 1.0:
            raise ConfigError(f"algo.filter_low={self.filter_low} / filter_high="
                              f"{self.filter_high} must satisfy 0 <= low <= high <= 1")
        if not 0.0 <= self.clip_low < 1.0:
            raise ConfigError(f"algo.clip_low={self.clip_low} must be in [0, 1)")
        if self.clip_high < 0.0:
            raise ConfigError(f"algo.clip_high={self.clip_high} must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ConfigError(f"algo.dual_clip={self.dual_clip} must be > 1 or null")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.cpgd_drift_coef < 0:
            raise ConfigError("algo.kl_coef, algo.entropy_coef and algo.cpgd_drift_coef must "
                              "be >= 0")
        if not self.grpo_eps > 0:
            raise ConfigError(f"algo.grpo_eps={self.grpo_eps} must be > 0")
        if self.clip_filter_like_cap is not None and not self.clip_filter_like_cap >= 1.0:
            raise ConfigError(f"algo.clip_filter_like_cap={self.clip_filter_like_cap} must be "
                              ">= 1 or null")
        if not self.rollout_is_cap > 1.0:
            raise ConfigError(f"algo.rollout_is_cap={self.rollout_is_cap} must be > 1")
        if self.loss == "gspo" and self.rollout_is == "token":
            raise ConfigError("algo.rollout_is=token weights tokens; algo.loss=gspo has one ratio "
                              "per sequence: use rollout_is=sequence or mask")
        if self.overlong_buffer < 0:
            raise ConfigError(f"algo.overlong_buffer={self.overlong_buffer} must be >= 0")
        return self


@dataclass
class RewardConfig:
    """Reward functions (`module:function`, each `(response, answer, meta) -> {name: score}`),
    the weight of each named score in the total, and the worker pool running them."""

    functions: list[str] = field(
        default_factory=lambda: ["eureka_megatron.rewards:rule_based_scores"])
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    num_workers: int = 2
    timeout: float = 5.0  # seconds per response; a timeout scores 0 and counts reward/timeouts
    # Score each distinct (response, gold, meta) once and remember it: rule-based rewards are pure
    # functions, and RL batches repeat responses (a converged group is n copies). Off for a
    # stochastic judge.
    memoize: bool = True
    # Phrases counted by the reflection ("visual aha") metrics; null: the built-in list.
    reflection_phrases: list[str] | None = None

    def validate(self) -> "RewardConfig":
        if not self.functions:
            raise ConfigError("rewards.functions must name at least one module:function")
        for i, f in enumerate(self.functions):
            if f.count(":") != 1 or not all(f.split(":")):
                raise ConfigError(f"rewards.functions[{i}]={f!r} is not of the form "
                                  "module:function")
        if self.num_workers < 1:
            raise ConfigError(f"rewards.num_workers={self.num_workers} must be >= 1")
        if not self.timeout > 0:
            raise ConfigError(f"rewards.timeout={self.timeout} must be > 0")
        return self


@dataclass
class Config:
    model: LLMConfig = field(default_factory=LLMConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)

    def validate(self) -> "Config":
        validate_layout(self.model, self.parallel)
        self.algo.validate()
        self.rewards.validate()
        t, p = self.train, self.parallel
        dp = p.dp
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be divisible by "
                f"train.micro_batch_size * DP = {t.micro_batch_size} * {dp}")
        n_micro = t.global_batch_size // (t.micro_batch_size * dp)
        if p.virtual_pipeline and n_micro % p.pipeline_parallel:
            raise ConfigError(
                f"the interleaved schedule needs micro-batches per step ({n_micro}) divisible by "
                f"parallel.pipeline_parallel={p.pipeline_parallel}")
        for name in ("steps", "seq_length", "micro_batch_size"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        return self

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.dp)


def check_threads(par: ParallelConfig) -> None:
    if par.threads is not None and (isinstance(par.threads, bool) or not isinstance(par.threads, int)
                                    or par.threads < 1):
        raise ConfigError(f"parallel.threads={par.threads!r} must be a positive integer or null")


def validate_layout(model: LLMConfig, par: ParallelConfig) -> None:
    """The divisibility rules megatron asserts deep inside a rank, checked up front."""
    tp, pp, vpp, n = par.tensor_parallel, par.pipeline_parallel, par.virtual_pipeline, par.nproc
    for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("nproc", n)):
        if v < 1:
            raise ConfigError(f"parallel.{name} must be >= 1, got {v}")
    if n % (tp * pp):
        raise ConfigError(
            f"world size parallel.nproc={n} is not divisible by TP*PP = {tp}*{pp} = {tp * pp}")
    check_threads(par)
    if model.num_attention_heads % tp:
        raise ConfigError(f"model.num_attention_heads={model.num_attention_heads} is not "
                          f"divisible by parallel.tensor_parallel={tp}")
    if model.num_key_value_heads % tp:
        raise ConfigError(f"model.num_key_value_heads={model.num_key_value_heads} (KV groups) is "
                          f"not divisible by parallel.tensor_parallel={tp}")
    if model.num_attention_heads % model.num_key_value_heads:
        raise ConfigError("model.num_attention_heads must be a multiple of num_key_value_heads")
    if vpp is not None and vpp < 2:
        raise ConfigError(f"parallel.virtual_pipeline must be >= 2 or null, got {vpp}")
    if vpp and pp < 2:
        raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline_parallel >= 2")
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


# --- loading -------------------------------------------------------------------------------


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        opts = typing.get_args(tp)
        if value is None and type(None) in opts:
            return None
        errors = []
        for opt in opts:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, path): _coerce(v, val_tp, f"{path}.{k}")
                for k, v in value.items()}
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{path}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is str and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are errors that name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML) to a nested dict, in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def read_config_data(path: str | Path | None, overrides: list[str] | None) -> dict:
    """YAML file (optional) + dotted overrides -> the nested dict, before typing."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    return apply_overrides(data, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + overrides -> a validated Config."""
    return from_dict(Config, read_config_data(path, overrides)).validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
