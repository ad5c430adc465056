"""The `RolloutEngine` seam: what the trainer asks of any generation backend (HF, SGLang).

Prompts go in already tokenized by the family's processor (the same ids the trainer will score);
each engine returns n samples per prompt with its own per-token log-probs, and accepts new
weights as buckets of HF-named full tensors. Every engine reports the version of the weights it
serves; `None` means a sync started and did not finish, and such an engine refuses to generate
(`StaleWeightsError`) until a complete sync (usually after `restart()`): stale or half-updated
weights are never served silently.

Log-prob contract: `Sample.logprobs[t]` is log softmax(logits_t / temperature)[token_t] over the
full vocabulary, before top-k / top-p truncation -- the quantity the trainer's fused kernel
computes, so the two are directly comparable.

Engines on GPUs of their own may instead receive weights by broadcast from the trainer's ranks
(`BroadcastReceiver`, driven by rollout/weight_broadcast.py); `weight_transport` says which.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import torch

from eureka_megatron.data.prompt import Prompt  # what the engine is asked; data/ makes them

NamedTensors = list[tuple[str, torch.Tensor]]  # one bucket: (HF name, full tensor) pairs


class StaleWeightsError(RuntimeError):
    """The engine's weights are not a complete, known version (an interrupted sync)."""


class EngineDeadError(RuntimeError):
    """The engine process is gone or does not answer; `restart()` then re-sync."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the text, as SGLang)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's EOS ids
    seed: int | None = None
    # MoE models: report each token's experts (`Sample.routed_experts`; SGLang's request field
    # of the same name) for routing replay
    return_routed_experts: bool = False

    def validate(self) -> "SamplingParams":
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass
class Sample:
    prompt_index: int
    token_ids: list[int]     # generated tokens, the stop / EOS token included when hit
    text: str                # decoded generated text (special tokens skipped)
    logprobs: list[float]    # one per token_ids entry; see the module docstring
    finish_reason: str       # "stop" (EOS / stop token / stop string) or "length"
    weight_version: int
    # MoE engines asked for their routing (SamplingParams.return_routed_experts): the experts
    # each token went to, int32 [prompt + len(token_ids) - 1, MoE layers, k] (SGLang's come as
    # [tokens, layers * k]; the last token is never fed back); what routing replay trains on
    # (models/routing_replay.py)
    routed_experts: torch.Tensor | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    weight_layout: str  # the HF naming layout its update_weights expects (see convert/)

    @property
    def weight_version(self) -> int | None: ...

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt; prompt i's samples are [i*n, (i+1)*n) of the result."""

    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Load every bucket, then serve `version`; on failure the version becomes None."""

    def release_memory(self) -> None:
        """Free weights / KV cache memory (colocated training); generate refuses until resumed."""

    def resume_memory(self) -> None: ...

    def health(self) -> bool:
        """True when the engine answers and can generate."""

    def restart(self) -> None:
        """Replace a dead or poisoned engine. Its version is then that of what it reloaded (0 for
        the original checkpoint) or None (nothing known) until the next complete sync."""


@dataclass(frozen=True)
class GroupJoin:
    """An engine's part in weight-update groups whose source (rank 0) is elsewhere: per group
    (name, the source's address and port), the groups' world size, the engine's first rank."""
    groups: tuple[tuple[str, str, int], ...]
    world_size: int
    rank_offset: int
    backend: str


@dataclass(frozen=True)
class ReceiverInfo:
    """The engine side of weight-update groups, as the senders need to know it."""
    url: str                # the senders offer the address of theirs that faces it
    ranks: int              # members it adds to each group (its TP ranks)
    backend: str            # "nccl" | "gloo"
    timeout: float          # seconds a group waits for its members
    joined: frozenset[str]  # the groups it is a member of now


@runtime_checkable
class BroadcastReceiver(Protocol):
    """An engine with `weight_transport == "distributed"`: weights arrive by broadcast."""
    weight_transport: str

    def receiver_info(self) -> ReceiverInfo: ...

    def receive_weights(self, stages: Sequence[tuple[str, Sequence[Any]]], version: int, *,
                        abort, join: GroupJoin | None = None) -> None:
        """Per group, receive each flat buffer (its FlatTensorMeta list) its source broadcasts,
        then serve `version`; `abort` (is_set / set) is shared with the sources. On failure the
        version is None and `abort` is set."""

    def leave_weight_groups(self) -> None: ...
