"""The RL run's configuration (`eureka-megatron train CONFIG.yaml`): typed sections, validated at
load, before any rank starts. Shares the parallel / optimizer / checkpoint / algorithm / reward
sections with `config.py`; the model comes from an HF checkpoint directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from eureka_megatron.config import (AlgoConfig, CheckpointConfig, ConfigError, OptimConfig,
                                    ParallelConfig, RewardConfig, check_threads, from_dict,
                                    read_config_data)
from eureka_megatron.runtime.layout import plan_layout

ENGINES = ("hf", "sglang")
WEIGHT_TRANSPORTS = ("auto", "tensor", "distributed")
LAUNCHERS = ("local", "ray")
MODES = ("on-policy", "off-policy")


@dataclass
class PolicyModelConfig:
    """The policy: an HF checkpoint directory (config.json, weights, tokenizer files)."""

    hf: str | None = None
    freeze_vision: bool = True  # the vision tower stays frozen
    # InternVL's mlp1 projector (Qwen2.5-VL's merger is part of its tower); null: as freeze_vision.
    # MM-Eureka's InternVL runs froze only the tower: false there.
    freeze_projector: bool | None = None
    rollout_dtype: str = "fp32"  # the HF engine's dtype: fp32 | bf16


@dataclass
class RLTrainConfig:
    steps: int = 100               # RL steps (rollout -> train -> sync)
    rollout_batch_size: int = 16   # prompts per step whose groups are trained on (after filtering)
    micro_batch_tokens: int = 4096  # micro-batches hold at most this many (padded) tokens
    mini_batches: int = 1          # optimizer steps per RL step (the batch split in this many)
    epochs: int = 1                # passes over the rollout batch
    mode: str = "on-policy"        # on-policy | off-policy (one step stale, rollout overlapped)
    seed: int = 1234
    log_interval: int = 1


@dataclass
class RolloutConfig:
    engine: str = "hf"             # hf (in-process transformers) | sglang
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
    weight_transport: str = "auto"  # SGLang weight sync: auto | tensor (IPC/HTTP) | distributed (NCCL)


@dataclass
class EvalConfig:
    interval: int = 10             # greedy held-out accuracy every N steps (and at 0 and the end); 0: off
    size: int = 128                # held-out prompts
    data: str | None = None        # a JSONL; default: the synthetic held-out split
    max_new_tokens: int | None = None  # default: rollout.max_new_tokens


@dataclass
class DataConfig:
    train: str | None = None       # JSONL file/dir (MM-Eureka Qwen / InternVL / plain rows); null: synthetic
    format: str = "auto"           # auto | qwen | internvl | plain
    synthetic_tasks: list[str] = field(default_factory=lambda: ["count_circles"])
    synthetic_size: int = 4096
    image_size: int = 56           # synthetic images
    system_prompt: str | None = "r1"  # "r1" / "r1-zero" (pretrained bases): built-in; null: none; else the text
    max_prompt_length: int = 2048
    min_pixels: int = 56 * 56
    max_pixels: int = 14 * 14 * 4 * 1280
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
    launcher: str = "local"        # local (spawned ranks) | ray (placement group; Ray local on CPU)
    address: str | None = None     # ray cluster address ("auto"); null: local Ray
    colocate: bool = True          # engines share the actor's GPUs (memory released while training)
    gpus_per_node: int = 8


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
        check_threads(p)
        if p.nproc % (p.tensor_parallel * p.pipeline_parallel):
            raise ConfigError(f"parallel.nproc={p.nproc} is not divisible by TP*PP = "
                              f"{p.tensor_parallel}*{p.pipeline_parallel}")
        if t.rollout_batch_size % t.mini_batches:
            raise ConfigError(f"train.rollout_batch_size={t.rollout_batch_size} must be divisible "
                              f"by train.mini_batches={t.mini_batches} (whole groups per mini-batch)")
        if t.mode not in MODES:
            raise ConfigError(f"train.mode={t.mode!r}; expected one of {', '.join(MODES)}")
        if r.engine not in ENGINES:
            raise ConfigError(f"rollout.engine={r.engine!r}; expected one of {', '.join(ENGINES)}")
        if r.mem_fraction_static is not None and (
                isinstance(r.mem_fraction_static, bool)
                or not isinstance(r.mem_fraction_static, (int, float))
                or not 0 < r.mem_fraction_static < 1):
            raise ConfigError(f"rollout.mem_fraction_static={r.mem_fraction_static!r} must be in "
                              "(0, 1) (the GPU memory share of SGLang's weights + KV cache) or null")
        if r.weight_transport not in WEIGHT_TRANSPORTS:
            raise ConfigError(f"rollout.weight_transport={r.weight_transport!r}; expected one of "
                              f"{', '.join(WEIGHT_TRANSPORTS)}")
        if not isinstance(r.deterministic, bool):
            raise ConfigError(f"rollout.deterministic={r.deterministic!r} must be true or false")
        if r.sglang_url is not None and not [u for u in r.sglang_url.split(",") if u.strip()]:
            raise ConfigError(f"rollout.sglang_url={r.sglang_url!r} names no server")
        if self.cluster.launcher not in LAUNCHERS:
            raise ConfigError(f"cluster.launcher={self.cluster.launcher!r}; expected one of "
                              f"{', '.join(LAUNCHERS)}")
        if self.cluster.launcher == "ray" and r.engine == "sglang":
            self._check_placement()
        if self.model.rollout_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"model.rollout_dtype={self.model.rollout_dtype!r}; expected fp32 or bf16")
        if r.n_samples < 2 and self.algo.estimator != "reinforce++":
            raise ConfigError(f"rollout.n_samples={r.n_samples}: group estimators "
                              f"({self.algo.estimator}) need at least 2 samples per prompt")
        if not r.temperature > 0:
            raise ConfigError(f"rollout.temperature={r.temperature} must be > 0 (log-probs are "
                              "of softmax(logits / T))")
        if self.eval.interval < 0 or self.eval.size < 1:
            raise ConfigError("eval.interval must be >= 0 and eval.size >= 1")
        if self.data.format not in ("auto", "qwen", "internvl", "plain"):
            raise ConfigError(f"data.format={self.data.format!r}; expected auto|qwen|internvl|plain")
        if self.warmup.steps < 0:
            raise ConfigError(f"warmup.steps={self.warmup.steps} must be >= 0")
        if self.model.hf is None:
            raise ConfigError("model.hf is required: an HF checkpoint directory (config.json, "
                              "weights, tokenizer)")
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
    return from_dict(RLConfig, read_config_data(path, overrides)).validate()
