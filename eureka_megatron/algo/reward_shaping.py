"""Shaping of the scalar sequence reward before advantages: KL-in-reward and DAPO's overlong penalty.

KL in the reward (`algo.kl_in: reward`) subtracts coef * sum_t kl_t from each sequence's reward
before the group baseline, as verl does; the alternative (`kl_in: loss`) is a loss term inside the
policy-loss kernel. The overlong penalty (DAPO) ramps from 0 to -factor over the last `buffer`
tokens before the generation limit, so truncated answers are discouraged without the hard 0 that
punishes long but correct reasoning.
"""
from __future__ import annotations

import torch

from eureka_megatron.kernels.policy_loss import kl_estimate


def kl_penalized_rewards(rewards: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, coef: float, kl_type: str = "k1"):
    """(rewards - coef * KL_b, KL_b): KL_b = sum over the response tokens of the per-token
    estimate (k1, k2 or k3) of KL(pi || pi_ref). All inputs [N] / [N, L]; no gradient."""
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, ref_logprobs "
                         f"{tuple(ref_logprobs.shape)} and mask {tuple(mask.shape)} must match")
    if rewards.shape != logprobs.shape[:1]:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be [N] for logprobs "
                         f"{tuple(logprobs.shape)}")
    active = mask != 0
    with torch.no_grad():
        lp = torch.where(active, logprobs.double(), 0.0)
        ref = torch.where(active, ref_logprobs.double(), 0.0)
        kl = torch.where(active, kl_estimate(lp, ref, kl_type), 0.0).sum(1)
    return (rewards.double() - coef * kl).to(rewards.dtype), kl.to(rewards.dtype)


def overlong_penalty(lengths, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment [N] (float64) for response lengths [N]:
    0 up to max_length - buffer, then linear down to -factor at max_length, -factor beyond."""
    if buffer <= 0 or buffer > max_length:
        raise ValueError(f"overlong buffer must be in [1, max_length={max_length}], got {buffer}")
    n = torch.as_tensor(lengths, dtype=torch.float64)
    start = max_length - buffer
    ramp = (start - n) / buffer * factor
    return torch.where(n <= start, torch.zeros_like(n), torch.clamp(ramp, min=-factor))
