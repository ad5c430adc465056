"""Train/rollout mismatch: the engine and the trainer score the same tokens differently.

On GPUs SGLang (bf16, its own kernels) and Megatron (TE) give different probabilities for the
same sampled tokens, so the policy gradient is silently off-policy. Rollout importance sampling
(verl's rollout IS, slime's truncated IS) reweights each token's loss by how much likelier the
trainer's old policy finds it than the engine did, with the engine's own log-probs:

  token     w_t = min(p_old(t) / p_rollout(t), C)                      per token
  sequence  w_b = min(exp(mean_t log(p_old / p_rollout)), C)           the geometric mean
  mask      sequences whose geometric-mean ratio lies outside [1/C, C] leave the loss; the rest
            are unweighted

The weights are constants (no gradient): they scale each token's (or sequence's) advantage,
which for the ppo/cpgd surrogates is scaling its loss term. Off by default (`algo.rollout_is`);
the mismatch metrics are reported every step either way.
"""
from __future__ import annotations

import math

import torch

from eureka_megatron.config.sections import ROLLOUT_IS_MODES as MODES


def _log_ratio(old: torch.Tensor, rollout: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    d = (old.detach().double() - rollout.double())
    return torch.where(active, d, torch.zeros_like(d))


def _seq_mean(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return x.sum(1) / active.sum(1).clamp(min=1)


def corrected(mode: str, cap: float, advantages: torch.Tensor, mask: torch.Tensor,
              old: torch.Tensor, rollout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, mask) with the rollout importance weights of `mode` applied.

    advantages [B] (or [B, L]); mask [B, L]; old / rollout log-probs [B, L]. Token mode returns
    [B, L] advantages; the sequence modes keep the advantages' shape."""
    if mode not in MODES:
        raise ValueError(f"rollout importance sampling mode {mode!r} is not one of {MODES}")
    if mode == "off":
        return advantages, mask
    if not cap > 1.0:
        raise ValueError(f"the rollout importance cap must be > 1, got {cap}")
    active = mask != 0
    log_r = _log_ratio(old, rollout, active)
    if mode == "token":
        w = torch.exp(log_r.clamp(max=math.log(cap)))
        B, L = mask.shape
        adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(B, L)
        return adv * w.to(adv.dtype), mask
    seq = _seq_mean(log_r, active)
    if mode == "sequence":
        w = torch.exp(seq.clamp(max=math.log(cap)))
        w = w if advantages.dim() == 1 else w[:, None]
        return advantages * w.to(advantages.dtype), mask
    keep = seq.abs() <= math.log(cap)
    return advantages, mask * keep[:, None].to(mask.dtype)


def mismatch_sums(old: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor,
                  cap: float) -> dict[str, torch.Tensor]:
    """Token sums of the mismatch metrics (divide by the response tokens): |log p_old - log
    p_rollout|, the k3 estimate of KL(rollout || old), exp(d) - 1 - d with d = log p_old -
    log p_rollout (the engine sampled the tokens), tokens whose ratio lies beyond [1/C, C];
    and the largest |d|."""
    active = mask != 0
    d = _log_ratio(old, rollout, active)
    on = active.to(torch.float64)
    k3 = (torch.exp(d.clamp(max=20.0)) - 1.0 - d) * on
    return {"rollout_logprob_abs_diff_tsum": d.abs().sum(),
            "rollout_logprob_abs_diff_max": d.abs().max() if d.numel() else d.new_zeros(()),
            "rollout_k3_kl_tsum": k3.sum(),
            "rollout_beyond_cap_tsum": ((d.abs() > math.log(cap)) & active).sum().double()}
