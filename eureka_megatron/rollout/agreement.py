"""Train / rollout log-prob agreement: the check that an engine samples from the trained policy.

Engines compute log-probs with their own kernels (and SGLang in bf16), so they drift from the
trainer's; a large drift means the engine runs stale or wrong weights, or the importance ratio of
the first PPO epoch is no longer 1. Logged every step as `rollout/logprob_abs_diff_*`.
"""
from __future__ import annotations

import torch


def logprob_agreement(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, float]:
    """Mean / max |engine - trainer| and the mean signed difference over the masked tokens."""
    if engine_logprobs.shape != trainer_logprobs.shape or mask.shape != engine_logprobs.shape:
        raise ValueError(f"shapes differ: engine {tuple(engine_logprobs.shape)}, trainer "
                         f"{tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    active = mask != 0
    if not active.any():
        return {"rollout/logprob_abs_diff_mean": 0.0, "rollout/logprob_abs_diff_max": 0.0,
                "rollout/logprob_diff_mean": 0.0}
    d = (engine_logprobs.double() - trainer_logprobs.double())[active]
    return {"rollout/logprob_abs_diff_mean": float(d.abs().mean()),
            "rollout/logprob_abs_diff_max": float(d.abs().max()),
            "rollout/logprob_diff_mean": float(d.mean())}
