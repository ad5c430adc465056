"""The RL run's configuration (`eureka-megatron train CONFIG.yaml`): typed sections, validated at
load, before any rank starts. Shares the parallel / optimizer / checkpoint / algorithm / reward
sections with `train-lm` (`config/sections.py`); the model comes from an HF checkpoint directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eureka_megatron.config.loader import load
from eureka_megatron.config.sections import (AlgoConfig, CheckpointConfig, OptimConfig,
                                             ParallelConfig, RewardConfig)
from eureka_megatron.errors import ConfigError
from eureka_megatron.runtime.layout import plan_layout


@dataclass
class PolicyModelConfig:
    """The policy: an HF checkpoint directory (config.json, weights, tokenizer files), or a
    megatron torch_dist checkpoint for the weights (`convert hf-to-megatron`'s output, a training
    step or run directory) with the HF side files (config, tokenizer) beside it in `hf/` or in
    `hf`: every rank then reads only its own shards, the path for 32B+ models."""

    hf: str | None = None
    megatron: str | None = None
    freeze_vision: bool = True  # the vision tower stays frozen
    # InternVL's mlp1 projector (Qwen2.5-VL's merger is part of its tower); null: as freeze_vision.
    # MM-Eureka's InternVL runs froze only the tower: false there.
    freeze_projector: bool | None = None
    rollout_dtype: Literal["fp32", "bf16"] = "fp32"  # the HF engine's dtype
    # Mixture-of-Experts models: weight of megatron's load-balancing (aux) loss on the routers;
    # 0 = off, as RL frameworks train; a checkpoint's router_aux_loss_coef is never used
    moe_aux_loss_coeff: float = 0.0

    @property
    def hf_dir(self) -> Path:
        """Config, tokenizer and processor files (and the weights, without `megatron`)."""
        return Path(self.hf) if self.hf else Path(self.megatron) / "hf"


@dataclass
class RLTrainConfig:
    steps: int = 100               # RL steps (rollout -> train -> sync)
    rollout_batch_size: int = 16   # prompts per step whose groups are trained on (after filtering)
    # micro-batches hold at most this many tokens (real tokens packed, rows x longest padded)
    micro_batch_tokens: int = 4096
    # packed micro-batches: sequences end to end, no compute on padding (else right-padded rows)
    sequence_packing: bool = True
    mini_batches: int = 1          # optimizer steps per RL step (the batch split in this many)
    epochs: int = 1                # passes over the rollout batch
    # off-policy: one step stale, the next rollout overlapped with training
    mode: Literal["on-policy", "off-policy"] = "on-policy"
    seed: int = 1234
    # activation recompute (LLM and vision tower): selective (attention core) | full (layers)
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"  # hf: in-process transformers
    n_samples: int = 8             # responses per prompt (the GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    max_filter_rounds: int = 4     # online filter: sample at most this many rounds to fill the batch
    sync_bucket_mb: int = 512
    engines: int = 1
    gpus_per_engine: int = 1
    sglang_url: str | None = None  # connect to running server(s) ("url1,url2") instead of launching
    mem_fraction_static: float | None = None  # SGLang's --mem-fraction-static; null: its default
    deterministic: bool = False    # SGLang --enable-deterministic-inference: seeds honoured (slower)
    # SGLang weight sync: tensor (IPC/HTTP) | distributed (NCCL); auto: by placement
    weight_transport: Literal["auto", "tensor", "distributed"] = "auto"
    # MoE models: the engine reports each token's experts and training replays them
    # (models/routing_replay.py), so train and rollout log-probs differ by rounding, not routing
    routing_replay: bool = False


@dataclass
class EvalConfig:
    interval: int = 10             # greedy held-out accuracy every N steps (and at 0 and the end); 0: off
    size: int = 128                # held-out prompts
    data: str | None = None        # a JSONL; default: the synthetic held-out split
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens


@dataclass
class DataConfig:
    train: str | None = None       # JSONL file/dir (MM-Eureka Qwen / InternVL / plain rows); null: synthetic
    format: Literal["auto", "qwen", "internvl", "plain"] = "auto"
    synthetic_tasks: list[str] = field(default_factory=lambda: ["count_circles"])
    synthetic_size: int = 4096
    image_size: int = 56           # synthetic images
    system_prompt: str | None = "r1"  # "r1" / "r1-zero" (pretrained bases): built-in; null: none; else the text
    max_prompt_length: int = 2048
    # Qwen-VL resize range (pixels of the resized image); null: the checkpoint's own, from its
    # preprocessor_config.json as SGLang's processor reads it (Qwen2.5-VL's hub file: 3136..12845056;
    # without a file: Qwen2.5-VL 3136..1003520, Qwen3-VL 65536..16777216)
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_tiles: int = 12            # InternVL dynamic tiling
    use_thumbnail: bool = True
    shuffle: bool = True


@dataclass
class WarmupConfig:
    """Stage 0: supervised steps that teach only the answer format (the answer is random), so
    RL starts from a model that follows the format but has not learned the task."""

    steps: int = 0
    batch_size: int = 64
    lr: float = 3e-4
    think: str = "count"           # the (fixed) text taught inside <think></think>


@dataclass
class ClusterConfig:
    # local: spawned ranks | ray: a placement group (Ray local on CPU)
    launcher: Literal["local", "ray"] = "local"
    address: str | None = None     # ray cluster address ("auto"); null: local Ray
    colocate: bool = True          # engines share the actor's GPUs (memory released while training)
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0    # one GPU's memory: the budget `train` checks its memory plan against


@dataclass
class OutputConfig:
    dir: str = "runs/rl"           # metrics.jsonl, tensorboard/, plots, summary.md, checkpoints/
    tensorboard: bool = True
    progress: bool = True
    hf_export_interval: int = 0    # write an HF checkpoint every N steps (and at the end); 0: end only
    hf_export: bool = True


@dataclass
class RLConfig:
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, min_lr=1e-6,
                                                                    warmup_steps=0))
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def group_size(self) -> int:
        return self.rollout.n_samples

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.output.dir) / "checkpoints"

    def validate(self) -> "RLConfig":
        self.optim.validate()
        self.algo.validate()
        self.rewards.validate()
        t, r, p = self.train, self.rollout, self.parallel
        for name, v in (("train.steps", t.steps), ("train.rollout_batch_size", t.rollout_batch_size),
                        ("train.micro_batch_tokens", t.micro_batch_tokens),
                        ("train.mini_batches", t.mini_batches), ("train.epochs", t.epochs),
                        ("rollout.n_samples", r.n_samples), ("rollout.max_new_tokens", r.max_new_tokens),
                        ("rollout.max_filter_rounds", r.max_filter_rounds),
                        ("rollout.engines", r.engines), ("parallel.nproc", p.nproc)):
            if v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")
        p.validate()
        if t.rollout_batch_size % t.mini_batches:
            raise ConfigError(f"train.rollout_batch_size={t.rollout_batch_size} must be divisible "
                              f"by train.mini_batches={t.mini_batches} (whole groups per mini-batch)")
        if r.mem_fraction_static is not None and (
                isinstance(r.mem_fraction_static, bool)
                or not isinstance(r.mem_fraction_static, (int, float))
                or not 0 < r.mem_fraction_static < 1):
            raise ConfigError(f"rollout.mem_fraction_static={r.mem_fraction_static!r} must be in "
                              "(0, 1) (the GPU memory share of SGLang's weights + KV cache) or null")
        if r.sglang_url is not None and not [u for u in r.sglang_url.split(",") if u.strip()]:
            raise ConfigError(f"rollout.sglang_url={r.sglang_url!r} names no server")
        if self.cluster.launcher == "ray" and r.engine == "sglang":
            self._check_placement()
        if r.n_samples < 2 and self.algo.estimator != "reinforce++":
            raise ConfigError(f"rollout.n_samples={r.n_samples}: group estimators "
                              f"({self.algo.estimator}) need at least 2 samples per prompt")
        if not r.temperature > 0:
            raise ConfigError(f"rollout.temperature={r.temperature} must be > 0 (log-probs are "
                              "of softmax(logits / T))")
        if self.eval.interval < 0 or self.eval.size < 1:
            raise ConfigError("eval.interval must be >= 0 and eval.size >= 1")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self.data, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"data.{name}={v!r} must be a pixel count >= 1 or null (the "
                                  "checkpoint's own)")
        if None not in (self.data.min_pixels, self.data.max_pixels) and \
                self.data.min_pixels > self.data.max_pixels:
            raise ConfigError(f"data.min_pixels={self.data.min_pixels} is above "
                              f"data.max_pixels={self.data.max_pixels}")
        if self.warmup.steps < 0:
            raise ConfigError(f"warmup.steps={self.warmup.steps} must be >= 0")
        if not self.model.moe_aux_loss_coeff >= 0:
            raise ConfigError(f"model.moe_aux_loss_coeff={self.model.moe_aux_loss_coeff} must be >= 0")
        if self.model.hf is None and self.model.megatron is None:
            raise ConfigError("model.hf is required: an HF checkpoint directory (config.json, "
                              "weights, tokenizer); or model.megatron: a torch_dist checkpoint "
                              "with its HF side files in hf/ (or in model.hf)")
        return self

    def _check_placement(self) -> None:
        """The GPU plan the Ray launcher will make (trainer ranks + SGLang engines), checked at load
        so that `--dry-run` refuses what `plan_layout` would refuse once the cluster is up."""
        r, c, n = self.rollout, self.cluster, self.parallel.nproc
        try:
            plan_layout(actor_world=n, engines=r.engines, gpus_per_engine=r.gpus_per_engine,
                        colocate=c.colocate, use_gpus=True, gpus_per_node=c.gpus_per_node)
        except ValueError as e:
            raise ConfigError(
                f"cluster layout (parallel.nproc={n}, rollout.engines={r.engines}, "
                f"rollout.gpus_per_engine={r.gpus_per_engine}, cluster.colocate={c.colocate}, "
                f"cluster.gpus_per_node={c.gpus_per_node}): {e}") from None


def load_rl_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RLConfig:
    """YAML file (optional) + dotted overrides -> a validated RLConfig."""
    return load(RLConfig, path, overrides)
