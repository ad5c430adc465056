"""Group-relative advantage estimators: one scalar per sampled response, no critic.

Samples of a prompt group are contiguous: rewards[g * n : (g + 1) * n] are the n responses of
prompt g. Every estimator gives exactly 0 to every sample of a group whose rewards are all equal
(such a group carries no learning signal; the online filter usually drops it first).

  grpo         (r - mean_g) / (std_g + 1e-6), std unbiased (Bessel), as GRPO / MM-Eureka
  dr_grpo      r - mean_g                          (Dr. GRPO: no std normalisation bias)
  rloo         r - mean of the other n - 1 samples = n / (n - 1) * (r - mean_g)
  reinforce++  r - mean_g, then divided by the unbiased std over the whole batch (+ 1e-6)
               (REINFORCE++-baseline: group baseline, batch whitening)
"""
from __future__ import annotations

import torch

from eureka_megatron.config import ESTIMATORS

EPS = 1e-6


def _as_rewards(rewards, group_size: int) -> tuple[torch.Tensor, torch.dtype]:
    t = torch.as_tensor(rewards)
    out_dtype = t.dtype if t.is_floating_point() else torch.float64
    if isinstance(rewards, (list, tuple)):
        out_dtype = torch.float64
    if t.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(t.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if t.numel() == 0 or t.numel() % group_size:
        raise ValueError(f"{t.numel()} rewards do not form whole groups of {group_size} "
                         "(samples of a group must be contiguous)")
    t = t.to(torch.float64)
    bad = (~torch.isfinite(t)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"reward {i} is {float(t[i])}: rewards must be finite")
    return t, out_dtype


def compute_advantages(rewards, group_size: int, estimator: str = "grpo") -> torch.Tensor:
    """Advantages [N] for rewards [N] (tensor or sequence) in contiguous groups of `group_size`.

    Computed in float64; returned in the rewards' floating dtype (float64 for lists / ints).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {', '.join(ESTIMATORS)}")
    r, out_dtype = _as_rewards(rewards, group_size)
    n = group_size
    if estimator in ("grpo", "rloo") and n < 2:
        raise ValueError(f"estimator {estimator!r} needs group_size >= 2, got {n}")
    g = r.view(-1, n)
    centred = g - g.mean(dim=1, keepdim=True)
    constant = (g.amax(dim=1) == g.amin(dim=1))[:, None]
    if estimator == "grpo":
        adv = centred / (g.std(dim=1, keepdim=True) + EPS)
    elif estimator == "dr_grpo":
        adv = centred
    elif estimator == "rloo":
        adv = centred * (n / (n - 1))
    else:  # reinforce++
        flat = centred.flatten()
        std = flat.std() if flat.numel() > 1 else torch.zeros((), dtype=torch.float64)
        adv = centred / (std + EPS)
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv.flatten().to(out_dtype)
