"""The run-config sections every run shares: parallel layout, optimizer, checkpoints, the RL
algorithm and the rewards. Choices are `Literal[...]` types: the loader refuses any other value,
naming the key, and the algorithm code reads its allowed names from the same types."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from eureka_megatron.errors import ConfigError
from eureka_megatron.kernels.options import Agg, KLType

DEFAULT_REWARD = "eureka_megatron.rewards:rule_based_scores"  # the run's and eval's default

Estimator = Literal["grpo", "dr_grpo", "rloo", "reinforce++"]
PolicyLoss = Literal["ppo", "gspo", "cpgd"]
RolloutIS = Literal["off", "token", "sequence", "mask"]  # algo/mismatch.py
Overlap = Literal["auto", True, False]  # auto: on when the rank has CUDA
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
ROLLOUT_IS_MODES: tuple[str, ...] = get_args(RolloutIS)


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
    # Megatron's sequence parallelism (needs TP > 1): the LLM's norms, dropouts and residuals run
    # on 1/TP of the sequence, so their activations divide by TP too; same loss and gradients.
    sequence_parallel: bool = False
    # Mixture-of-Experts layouts (megatron's expert parallelism): the experts of each MoE layer
    # are split over `expert_parallel` ranks (tokens travel to their experts by all-to-all), each
    # expert's MLP over `expert_tensor_parallel` ranks (null: tensor_parallel, megatron's
    # default). The expert ranks are carved out of the same nproc: nproc must be divisible by
    # expert_tensor_parallel * expert_parallel * pipeline_parallel; the rest is the experts' DP.
    expert_parallel: int = 1
    expert_tensor_parallel: int | None = None

    @property
    def dp(self) -> int:
        return self.nproc // (self.tensor_parallel * self.pipeline_parallel)

    @property
    def etp(self) -> int:
        """Expert tensor parallel size (megatron's default: the tensor parallel size)."""
        return self.expert_tensor_parallel or self.tensor_parallel

    @property
    def expert_dp(self) -> int:
        """Data parallel size of the expert weights (their gradients are reduced over it)."""
        return self.nproc // (self.etp * self.expert_parallel * self.pipeline_parallel)

    def validate(self) -> "ParallelConfig":
        """The layout's own rules (the model's are `validate_layout`)."""
        tp, pp, vpp, n = self.tensor_parallel, self.pipeline_parallel, self.virtual_pipeline, self.nproc
        for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("nproc", n)):
            if v < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {v}")
        if n % (tp * pp):
            raise ConfigError(f"world size parallel.nproc={n} is not divisible by TP*PP = "
                              f"{tp}*{pp} = {tp * pp}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ConfigError(f"parallel.threads={self.threads!r} must be a positive integer or null")
        if vpp is not None and vpp < 2:
            raise ConfigError(f"parallel.virtual_pipeline must be >= 2 or null, got {vpp}")
        if vpp and pp < 2:
            raise ConfigError("parallel.virtual_pipeline needs parallel.pipeline_parallel >= 2")
        if self.sequence_parallel and tp < 2:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel >= 2")
        ep, etp = self.expert_parallel, self.expert_tensor_parallel
        for name, v in (("expert_parallel", ep), ("expert_tensor_parallel", etp)):
            if v is not None and (isinstance(v, bool) or v < 1):
                raise ConfigError(f"parallel.{name} must be >= 1, got {v!r}")
        if n % (self.etp * ep * pp):
            raise ConfigError(
                f"world size parallel.nproc={n} is not divisible by parallel.expert_tensor_parallel"
                f" * parallel.expert_parallel * parallel.pipeline_parallel = {self.etp}*{ep}*{pp}"
                f" = {self.etp * ep * pp} (megatron's expert layout"
                + ("; expert_tensor_parallel defaults to tensor_parallel)" if etp is None else ")"))
        return self

    def describe(self) -> str:
        vpp = f" x VPP{self.virtual_pipeline}" if self.virtual_pipeline else ""
        sp = " (sequence parallel)" if self.sequence_parallel else ""
        experts = ""
        if self.expert_parallel > 1 or self.etp != self.tensor_parallel:
            experts = (f"; experts EP{self.expert_parallel} x ETP{self.etp} x "
                       f"EDP{self.expert_dp}")
        return (f"TP{self.tensor_parallel} x PP{self.pipeline_parallel}{vpp} x DP{self.dp} = "
                f"{self.nproc} ranks{sp}{experts}")


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
    # Megatron's communication overlap (auto: on when the rank has CUDA). overlap_grad_reduce
    # starts each gradient bucket's reduce(-scatter) during the backward pass, as soon as the
    # bucket's last gradient is in; overlap_param_gather (distributed optimizer) all-gathers the
    # updated parameters during the next forward pass instead of right after the step. Either
    # way the same numbers: only when the communication runs changes. Megatron's bucket
    # bookkeeping expects a gradient for every trainable parameter in each step's last
    # micro-batch: a trainable vision tower with text-only rows wants overlap_grad_reduce false.
    overlap_grad_reduce: Overlap = "auto"
    overlap_param_gather: Overlap = "auto"
    # parameters per gradient bucket when overlapping (null: megatron's max(40M, 1M x DP));
    # smaller buckets start communicating earlier, at more collectives per step
    ddp_bucket_size: int | None = None

    def validate(self) -> "OptimConfig":
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ConfigError(f"optim.ddp_bucket_size={self.ddp_bucket_size} must be >= 1 or null")
        if self.overlap_param_gather is True and not self.distributed_optimizer:
            raise ConfigError("optim.overlap_param_gather=true needs optim.distributed_optimizer="
                              "true (the parameters it gathers are the optimizer's DP shards)")
        if self.overlap_param_gather is True and self.overlap_grad_reduce is False:
            raise ConfigError("optim.overlap_param_gather=true needs optim.overlap_grad_reduce "
                              "true or auto (megatron overlaps the gather only with an "
                              "overlapped gradient reduce)")
        return self

    def overlap(self, cuda: bool) -> tuple[bool, bool]:
        """(overlap_grad_reduce, overlap_param_gather) on a rank with or without CUDA: auto is
        on with CUDA; a requested param gather overlap brings the grad reduce overlap with it."""
        param = (cuda and self.distributed_optimizer if self.overlap_param_gather == "auto"
                 else self.overlap_param_gather)
        grad = cuda or param if self.overlap_grad_reduce == "auto" else self.overlap_grad_reduce
        return grad, param and grad


@dataclass
class CheckpointConfig:
    dir: str | None = None
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 3
    load: str | None = None  # a run dir (uses its `latest`) or one step_* dir
    # write the shards in a background process while training goes on; `latest` moves to a step
    # (and keep_last prunes) only once every rank's write finished
    async_save: bool = False


@dataclass
class AlgoConfig:
    """The RL algorithm: advantage estimator, online filter, policy loss, KL, entropy, shaping.

    Defaults are MM-Eureka-Qwen's recipe (GRPO, online filter [0.1, 0.9], eps 0.2, ratio cap 3,
    no KL) with a token-mean loss; see docs in `eureka_megatron/algo/`.
    """

    estimator: Estimator = "grpo"
    whiten: bool = False  # whiten advantages over the batch's tokens (always for reinforce++)
    grpo_eps: float = 1e-6  # grpo's (r - mean) / (std + eps); MM-Eureka's group_norm: 1e-9
    # CPGD's clip-filter-like group weight min(G / (G - #zero-variance groups), cap); null: off
    clip_filter_like_cap: float | None = None
    online_filter: bool = True  # keep groups whose mean accuracy lies in [filter_low, filter_high]
    filter_low: float = 0.1
    filter_high: float = 0.9
    loss: PolicyLoss = "ppo"  # ppo (clip, clip-higher, dual clip) | gspo (sequence ratio) | cpgd
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low: DAPO's clip-higher (e.g. 0.28)
    dual_clip: float | None = 3.0  # ppo/gspo: cap -A*ratio for A < 0 (MM-Eureka's ratio cap 3)
    agg: Agg = "token-mean"
    kl_coef: float = 0.0
    kl_type: KLType = "k3"
    kl_in: Literal["loss", "reward"] = "loss"  # a loss term | subtracted from each sequence's reward
    entropy_coef: float = 0.0
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N tokens; 0 = off
    overlong_factor: float = 1.0
    cpgd_drift_coef: float = 0.01  # CPGD policy-drift weight and ratio clip (MM-Eureka defaults)
    cpgd_drift_clip: float = 2.0
    # train/rollout mismatch correction with the engine's log-probs (algo/mismatch.py):
    # capped at rollout_is_cap
    rollout_is: RolloutIS = "off"
    rollout_is_cap: float = 2.0

    def validate(self) -> "AlgoConfig":
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

    functions: list[str] = field(default_factory=lambda: [DEFAULT_REWARD])
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
