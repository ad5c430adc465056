"""Group-relative advantage estimators: one scalar per sampled response, no critic.

Samples of a prompt group are contiguous: rewards[g * n : (g + 1) * n] are the n responses of
prompt g. Before whitening every estimator gives exactly 0 to every sample of a group whose
rewards are all equal (such a group carries no learning signal; the online filter usually drops
it first).

  grpo         (r - mean_g) / (std_g + eps), std unbiased (Bessel), as GRPO / MM-Eureka
               (eps 1e-6 as verl; MM-Eureka's group_norm uses 1e-9: `algo.grpo_eps`)
  dr_grpo      r - mean_g                          (Dr. GRPO: no std normalisation bias)
  rloo         r - mean of the other n - 1 samples = n / (n - 1) * (r - mean_g)
  reinforce++  r - mean_g, then whitened over the batch's tokens (REINFORCE++-baseline)

Token whitening (`whiten_over_tokens`; always for reinforce++, `algo.whiten` for the others, as
OpenRLHF does for rloo): each sequence's advantage stands for its `length` response tokens; the
token-weighted mean is subtracted and the result divided by the token standard deviation,
population form with the variance clamped at 1e-8 -- OpenRLHF's experience maker, the
REINFORCE++ authors' code. verl's masked_whiten differs only by Bessel's correction of the
variance (sum(L) - 1 in place of sum(L)). After whitening an all-equal group is no longer 0 (it
gets minus the batch mean, as in both references).
"""
from __future__ import annotations

import torch

from eureka_megatron.config.sections import ESTIMATORS

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


def compute_advantages(rewards, group_size: int, estimator: str = "grpo", *,
                       lengths=None, whiten: bool = False, grpo_eps: float = EPS,
                       clip_filter_like_cap: float | None = None) -> torch.Tensor:
    """Advantages [N] for rewards [N] (tensor or sequence) in contiguous groups of `group_size`.

    lengths: response tokens per sequence [N], needed for token whitening (reinforce++, whiten).
    clip_filter_like_cap: CPGD's clip-filter-like weight (`clip_filter_like_weights`), applied
    to every estimator when given.
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
        adv = centred / (g.std(dim=1, keepdim=True) + grpo_eps)
    elif estimator == "dr_grpo":
        adv = centred
    elif estimator == "rloo":
        adv = centred * (n / (n - 1))
    else:  # reinforce++
        adv = centred
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    if clip_filter_like_cap is not None:
        adv = adv * clip_filter_like_weights(constant[:, 0], clip_filter_like_cap)[:, None]
    adv = adv.flatten()
    if estimator == "reinforce++" or whiten:
        if lengths is None:
            raise ValueError(f"estimator {estimator!r} with token whitening needs the response "
                             "lengths")
        adv = whiten_over_tokens(adv, lengths)
    return adv.to(out_dtype)


def clip_filter_like_weights(constant: torch.Tensor, cap: float = 3.0) -> torch.Tensor:
    """CPGD's clip-filter-like weight per group: groups with reward variance get
    min(G / (G - #constant groups), cap), constant groups 1 (they are 0 anyway) -- the surviving
    groups carry the weight a filter that dropped the constant ones would give them."""
    groups, dead = constant.numel(), int(constant.sum())
    w = min(groups / (groups - dead), cap) if dead < groups else 1.0
    return torch.where(constant, torch.ones((), dtype=torch.float64),
                       torch.full((), w, dtype=torch.float64))


def whiten_over_tokens(adv: torch.Tensor, lengths) -> torch.Tensor:
    """(adv - token mean) / token std, every sequence weighted by its token count (module doc)."""
    w = torch.as_tensor(lengths, dtype=torch.float64).flatten()
    if w.shape != adv.shape:
        raise ValueError(f"{w.numel()} lengths for {adv.numel()} advantages")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("lengths must be >= 0 with at least one token in the batch")
    a = adv.to(torch.float64)
    mean = (w * a).sum() / w.sum()
    var = (w * (a - mean) ** 2).sum() / w.sum()
    return (a - mean) * var.clamp(min=1e-8).rsqrt()
