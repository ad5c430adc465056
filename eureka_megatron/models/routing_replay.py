"""Routing replay (R3): the training forward sends each token to the experts the rollout engine
chose for it, instead of re-deciding.

Why: a Mixture-of-Experts router picks the top k of E scores. The trainer and the engine compute
those scores with different kernels, batch shapes and TP reductions, so near-ties flip: the same
token goes to another expert, and its log-prob under the trainer differs from the engine's by far
more than rounding. Importance ratios and the rollout-vs-trainer metrics then measure routing
noise. Replaying the engine's choices keeps the experts fixed; the gate weights of the chosen
experts are still the trainer's own (softmax over the chosen logits), so gradients reach the
router as without replay.

Where the choices come from: `Sample.routed_experts`, [prompt + response - 1, MoE layers, k]
expert ids per token (the last response token is never fed to the engine; SGLang's
`return_routed_experts` has the same layout). `trainer.batches` lays them out like the input ids:
`mb["routed_experts"]` [B, S, layers, k] (padded rows) or [1, T, layers, k] (packed).
Here, around one chunk's forward, every router of the chunk gets its layer's ids in megatron's
token order (sequence-major, [S, B] flattened; under sequence parallelism this TP rank's slice of
the sequence) through the `router_replay` hook of megatron-core's top-k routing, and is reset
after. Positions without a recorded choice (the last token, padding) carry experts 0..k-1: their
outputs feed no label.

Full activation recompute re-runs each layer's forward inside the backward pass, after this
context has closed and, under pipeline schedules, after later micro-batches' forwards: each
router then queues the ids of every forward that autograd will recompute and hands them out in
order when it runs inside the backward pass (1F1B and interleaved schedules run a micro-batch's
backward in the order of the forwards, per layer).
"""
from __future__ import annotations

from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch

from eureka_megatron.errors import ConfigError


def check_config(enabled: bool, text_cfg) -> None:
    """`rollout.routing_replay` needs a MoE model."""
    if not enabled:
        return
    if not getattr(text_cfg, "is_moe", False):
        raise ConfigError("rollout.routing_replay=true needs a Mixture-of-Experts model; this "
                          "model's LLM is dense")


class RoutedExperts:
    """A router's replay hook (megatron calls `get_replay_topk` in place of its top-k): the ids
    set for the current forward, and those queued for recompute inside the backward pass."""

    def __init__(self):
        self.target: torch.Tensor | None = None
        self.queue_for_recompute = False  # training under full recompute
        self.recompute: deque[torch.Tensor] = deque()

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):
        if torch._C._current_graph_task_id() != -1:  # a recompute inside the backward pass
            index = self.recompute.popleft()
        elif self.target is None:
            return default_compute_topk(scores, topk, num_groups, group_topk)
        else:
            index = self.target  # (megatron's checkpointed forward runs under no_grad)
            if self.queue_for_recompute:
                self.recompute.append(index)
        index = index.to(scores.device)
        return scores.gather(1, index), index


def routers(chunk: torch.nn.Module) -> list:
    """megatron's MoE routers in this chunk (each with `layer_number`, 1-based and global)."""
    from megatron.core.transformer.moe.router import TopKRouter

    return [m for m in chunk.modules() if isinstance(m, TopKRouter)]


def megatron_token_order(routing: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[B, S, layers, k] -> [tokens, layers, k] in the order megatron's router sees the tokens:
    the [S, B] hidden states flattened; under sequence parallelism this TP rank's S / TP rows."""
    tokens = routing.transpose(0, 1)  # [S, B, layers, k]
    if sequence_parallel:
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        step = tokens.shape[0] // tp
        tokens = tokens[rank * step:(rank + 1) * step]
    return tokens.reshape(-1, *routing.shape[2:])


@contextmanager
def replaying(chunk: torch.nn.Module, mb: dict) -> Iterator[None]:
    """Inside: the chunk's routers follow `mb["routed_experts"]` (no-op without it)."""
    routing = mb.get("routed_experts")
    found = routers(chunk) if routing is not None else []
    if not found:
        yield
        return
    tokens = megatron_token_order(routing, found[0].config.sequence_parallel)
    layers = routing.shape[2]
    for router in found:
        index = router.layer_number - 1
        if not 0 <= index < layers:
            raise ValueError(f"routing replay: the micro-batch has routing for {layers} MoE "
                             f"layers; the model's router of layer {router.layer_number} has none")
        if not isinstance(router.router_replay, RoutedExperts):
            router.router_replay = RoutedExperts()
        router.router_replay.target = tokens[:, index].long()
        router.router_replay.queue_for_recompute = (
            router.training and router.config.recompute_granularity == "full")
    try:
        yield
    finally:
        for router in found:
            router.router_replay.target = None


def filler(tokens: int, layers: int, k: int, dtype=torch.int32) -> torch.Tensor:
    """Expert ids 0..k-1 for positions whose routing no engine recorded (their outputs feed no
    label): [tokens, layers, k]."""
    return torch.arange(k, dtype=dtype).expand(tokens, layers, k).clone()
