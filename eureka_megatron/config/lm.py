"""The `train-lm` run (the Qwen2.5-family LLM on synthetic token patterns): its model section is
the LLM architecture itself."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from eureka_megatron.config.loader import load
from eureka_megatron.config.sections import (AlgoConfig, CheckpointConfig, OptimConfig,
                                             ParallelConfig, RewardConfig)
from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm_config import LLMConfig, validate_layout


@dataclass
class TrainConfig:
    steps: int = 20
    seq_length: int = 64
    micro_batch_size: int = 2
    global_batch_size: int = 8  # sequences per optimizer step, across DP and micro-batches
    seed: int = 1234
    log_interval: int = 1  # print every N steps
    recompute: Literal["none", "selective", "full"] = "none"  # activation recompute


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
        self.optim.validate()
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
        if p.sequence_parallel and t.seq_length % p.tensor_parallel:
            raise ConfigError(f"train.seq_length={t.seq_length} must be divisible by "
                              f"parallel.tensor_parallel={p.tensor_parallel} with "
                              "parallel.sequence_parallel")
        return self

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.dp)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + overrides -> a validated train-lm Config."""
    return load(Config, path, overrides)
