"""Policy-loss variants (PPO/DAPO clip, dual clip, GSPO, CPGD) on top of the fused loss kernel,
in the gradient-accumulation contract of `trainer.train_step`.

`policy_loss_sums` returns, for one micro-batch, (numerator, count, metrics) such that the step's
loss is  sum(numerators) / sum(counts)  over every micro-batch and data-parallel rank. Megatron
(`calculate_per_token_loss`) all-reduces the counts once per step and divides the accumulated
gradients by that global total, so the gradient does not depend on how the batch is split:

  agg                       numerator (this micro-batch)              count
  token-mean                sum_b sum_l m * loss_tok                  response tokens
  seq-mean-token-mean       sum_b mean_l(m * loss_tok)                sequences with >= 1 token
  seq-mean-token-sum-norm   sum_b sum_l m * loss_tok / L_norm         sequences with >= 1 token
(L_norm = `sum_norm_length`, a constant such as the generation limit: Dr. GRPO's normaliser).

Variants (`algo.loss`):
  ppo   kernel as is: ratio clip [1 - clip_low, 1 + clip_high] (clip_high > clip_low: DAPO's
        clip-higher), dual clip for A < 0 (`dual_clip` = 3 is MM-Eureka's ratio cap).
  gspo  sequence-level ratio s_b = exp(mean_l(lp - old)) (GSPO): the kernel gets the "GSPO-token"
        log-probs lp - sg(lp) + sg(log s_b) against 0, so every token of a sequence has ratio s_b
        and d s / d lp_t = s_b, which with per-sequence advantages is GSPO's gradient. Needs [B]
        advantages; use GSPO's tiny clip ranges (e.g. 3e-4 / 4e-4).
  cpgd  MM-Eureka's clipped policy gradient: loss_tok = -A * clip(lp - old) with the log-ratio
        capped at log(1 + clip_high) for A > 0 and floored at log(1 - clip_low) for A < 0, plus
        the policy-drift term coef * min(ratio - 1, drift_clip) * (lp - old) (ratio detached).
        Values are relative to the old policy (MM-Eureka's use lp, a constant offset).
KL to the reference (k1/k2/k3) in the loss and the entropy bonus are added by the kernel for
every variant (for gspo/cpgd through a second kernel call with zero advantages).
"""
from __future__ import annotations

import math

import torch

from eureka_megatron.config import AlgoConfig
from eureka_megatron.kernels.policy_loss import LOG_RATIO_CLAMP, policy_loss, row_weights


def _count(agg: str, active: torch.Tensor) -> torch.Tensor:
    if agg == "token-mean":
        return active.sum().to(torch.int)
    return active.any(dim=1).sum().to(torch.int)


def _denominator(agg: str, sum_norm_length: int | None) -> float:
    if agg != "seq-mean-token-sum-norm":
        return 1.0
    if not sum_norm_length or sum_norm_length < 1:
        raise ValueError("agg='seq-mean-token-sum-norm' needs sum_norm_length (the generation "
                         f"limit, a constant for the whole run), got {sum_norm_length!r}")
    return float(sum_norm_length)


def _masked_mean(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    n = active.sum()
    return torch.where(active, x, torch.zeros_like(x)).sum() / n.clamp(min=1)


def _ratio_metrics(log_r: torch.Tensor, active: torch.Tensor) -> dict[str, torch.Tensor]:
    """approx_kl and ratio statistics of the token-level ratio (what the kernel reports)."""
    with torch.no_grad():
        r = torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        one = torch.ones((), dtype=r.dtype, device=r.device)
        any_ = active.any()
        return {
            "approx_kl": _masked_mean(-log_r, active),
            "ratio_mean": torch.where(any_, _masked_mean(r, active), one),
            "ratio_min": torch.where(any_, torch.where(active, r, math.inf).min(), one),
            "ratio_max": torch.where(any_, torch.where(active, r, -math.inf).max(), one),
        }


def policy_loss_sums(algo: AlgoConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, mask: torch.Tensor, *,
                     ref_logprobs: torch.Tensor | None = None, entropy: torch.Tensor | None = None,
                     sum_norm_length: int | None = None, backend: str | None = None):
    """(numerator, count, metrics) of one micro-batch; see the module docstring.

    logprobs [B, L] (differentiable), old_logprobs / ref_logprobs [B, L], advantages [B] (or
    [B, L] for ppo/cpgd), mask [B, L] 0/1, entropy [B, L] (differentiable when
    `algo.entropy_coef` > 0; also reported). `ref_logprobs` is required when the KL is a loss term
    with kl_coef > 0, optional otherwise (then `kl` is only reported).
    """
    active = mask != 0
    denominator = _denominator(algo.agg, sum_norm_length)
    kl_coef = algo.kl_coef if algo.kl_in == "loss" else 0.0
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"algo.kl_coef={algo.kl_coef} with kl_in='loss' needs ref_logprobs")
    if entropy is not None and algo.entropy_coef == 0.0:
        entropy = entropy.detach()
    common = dict(agg=algo.agg, denominator=denominator, backend=backend)
    regular = dict(ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_type=algo.kl_type,
                   entropy=entropy, entropy_coef=algo.entropy_coef)

    if algo.loss == "ppo":
        loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask,
                                    clip_low=algo.clip_low, clip_high=algo.clip_high,
                                    dual_clip=algo.dual_clip, **regular, **common)
        return loss, _count(algo.agg, active), metrics

    if algo.loss == "gspo" and advantages.dim() != 1:
        raise ValueError("algo.loss='gspo' needs per-sequence advantages [B], got shape "
                         f"{tuple(advantages.shape)}")
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    lp = torch.where(active, logprobs, zero)
    log_r = torch.where(active, lp - old_logprobs.to(lp.dtype), zero)
    if algo.loss == "gspo":
        n_b = active.sum(1).clamp(min=1)
        seq_log_r = (log_r.detach().sum(1) / n_b)[:, None]
        token_lp = lp - lp.detach() + seq_log_r
        loss, metrics = policy_loss(token_lp, torch.zeros_like(token_lp), advantages, mask,
                                    clip_low=algo.clip_low, clip_high=algo.clip_high,
                                    dual_clip=algo.dual_clip, **common)
        metrics["seq_ratio_mean"] = metrics.pop("ratio_mean")
        metrics["seq_ratio_min"] = metrics.pop("ratio_min")
        metrics["seq_ratio_max"] = metrics.pop("ratio_max")
        metrics.pop("approx_kl")
    else:
        loss, metrics = _cpgd(algo, log_r, advantages, mask, active, denominator)
    metrics.update(_ratio_metrics(log_r.detach(), active))
    if ref_logprobs is not None or entropy is not None:
        reg, reg_metrics = policy_loss(logprobs, old_logprobs,
                                       torch.zeros_like(advantages), mask, **regular, **common)
        loss = loss + reg
        metrics.update({k: reg_metrics[k] for k in ("kl", "entropy") if k in reg_metrics})
    return loss, _count(algo.agg, active), metrics


def _cpgd(algo: AlgoConfig, log_r, advantages, mask, active, denominator):
    B, L = log_r.shape
    A = advantages if advantages.dim() == 2 else advantages[:, None].expand(B, L)
    A = torch.where(active, A.to(log_r.dtype), torch.zeros((), dtype=log_r.dtype,
                                                            device=log_r.device))
    hi, lo = math.log1p(algo.clip_high), math.log1p(-algo.clip_low)
    clipped = torch.where(A > 0, log_r.clamp(max=hi), torch.where(A < 0, log_r.clamp(min=lo), log_r))
    pg = -A * clipped
    ratio = torch.exp(log_r.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    drift = algo.cpgd_drift_coef * (ratio - 1.0).clamp(max=algo.cpgd_drift_clip) * log_r
    w = row_weights(algo.agg, mask, denominator).to(log_r.dtype)
    m = active.to(log_r.dtype)
    loss = (w * (m * (pg + drift)).sum(1)).sum()
    with torch.no_grad():
        lr = log_r.detach()
        metrics = {
            "clipfrac_low": _masked_mean(((A < 0) & (lr < lo)).to(lr.dtype), active),
            "clipfrac_high": _masked_mean(((A > 0) & (lr > hi)).to(lr.dtype), active),
            "clipfrac_dual": torch.zeros((), dtype=lr.dtype, device=lr.device),
            "pg_loss": _masked_mean(pg.detach(), active),
            "drift_loss": _masked_mean(drift.detach(), active),
        }
    return loss, metrics
