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
the sequence) through megatron-core's `RouterReplay` (REPLAY_FORWARD), and is reset after.
Positions without a recorded choice (the last token, padding) carry experts 0..k-1: their outputs
feed no label.

Not with full activation recompute: megatron re-runs a layer's forward during the backward pass,
outside this context (refused by the config check).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from eureka_megatron.errors import ConfigError


def check_config(enabled: bool, text_cfg, recompute: str) -> None:
    """`rollout.routing_replay` needs a MoE model and no full recompute (module docstring)."""
    if not enabled:
        return
    if not getattr(text_cfg, "is_moe", False):
        raise ConfigError("rollout.routing_replay=true needs a Mixture-of-Experts model; this "
                          "model's LLM is dense")
    if recompute == "full":
        raise ConfigError("rollout.routing_replay=true cannot be combined with train.recompute=full "
                          "(megatron re-runs each layer's forward in the backward pass, outside "
                          "the replay); use selective or none")


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
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    tokens = megatron_token_order(routing, found[0].config.sequence_parallel)
    layers = routing.shape[2]
    for router in found:
        index = router.layer_number - 1
        if not 0 <= index < layers:
            raise ValueError(f"routing replay: the micro-batch has routing for {layers} MoE "
                             f"layers; the model's router of layer {router.layer_number} has none")
        if router.router_replay is None:
            router.router_replay = RouterReplay()
        router.router_replay.set_target_indices(tokens[:, index].long())
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for router in found:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


def filler(tokens: int, layers: int, k: int, dtype=torch.int32) -> torch.Tensor:
    """Expert ids 0..k-1 for positions whose routing no engine recorded (their outputs feed no
    label): [tokens, layers, k]."""
    return torch.arange(k, dtype=dtype).expand(tokens, layers, k).clone()
