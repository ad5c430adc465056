"""Fused PPO/GRPO policy loss: clipped surrogate (+ dual clip) + KL to a reference + entropy bonus.

    from eureka_megatron.kernels.policy_loss import policy_loss
    loss, metrics = policy_loss(logprobs, old_logprobs, advantages, mask,
                                ref_logprobs=ref, kl_coef=1e-3, agg="token-mean",
                                denominator=global_token_count)

Why
---
A plain-torch policy loss is ~20 elementwise ops over [B, L], each a kernel launch and a full
read + write of a [B, L] fp32 tensor, and autograd keeps several of those intermediates alive for
the backward. Here the Triton backend reads every input once in ONE forward kernel (per-token
ratio, surrogate, KL, the per-token gradient coefficient d loss_tok / d logprob, and per-block
partial sums of every statistic) and writes the gradient in ONE backward kernel
(grad = upstream * aggregation weight of the row * saved coefficient). Only [B]-sized and scalar
reductions run in torch. The torch backend (`backend="torch"`) is the autograd reference: same
formulas, computed in float64 when the inputs are float64, so it can be checked exactly.

Exact per-token formulas (A = advantage, broadcast over L when given per sequence [B])
---------------------------------------------------------------------------------------
  log_r = logprobs - old_logprobs
  ratio = exp(clamp(log_r, -20, 20))          # clamp only guards fp32 overflow (gradient 0 outside)
  pg    = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
  pg    = min(pg, -A * dual_clip)  if dual_clip is not None and A < 0         (dual clip, c > 1)
  kl    = k1: lp - ref  |  k2: (lp - ref)^2 / 2  |  k3: exp(x) - x - 1,  x = clamp(ref - lp, -20, 20)
  loss_tok = pg + kl_coef * kl - entropy_coef * entropy
Gradients flow to `logprobs` and `entropy` only (old/ref/advantages/mask are constants):
  d pg / d lp  = -A * ratio, or 0 where a clip is active (see clip fractions below);
  d kl / d lp  = 1 | lp - ref | 1 - exp(ref - lp);   d loss_tok / d entropy = -entropy_coef.
k3 and exp(x) - 1 use a Taylor series for |x| < 1/2 (no cancellation: the KL of two close
policies is accurate to fp32 rounding, not to 1e-7 absolute). Unlike verl's `low_var_kl` the k3
value is not clamped to [-10, 10].

Aggregation (m = mask, 0/1 bool or numeric; n_b = sum_l m[b, l]; rows with n_b = 0 add nothing)
-------------------------------------------------------------------------------------------------
  "token-mean"              sum_{b,l} m * loss_tok / D,          D = sum_b n_b (1 if that is 0)
        Every generated token weighs the same (DAPO / BNPO). The default: unbiased w.r.t. length.
  "seq-mean-token-mean"     sum_b (sum_l m * loss_tok / n_b) / D,  D = B (all B rows, including
        empty ones: the mean over the B sequences, so that micro-batches add up with D = the
        global number of sequences). Original GRPO: every sequence weighs the same, so tokens of
        long answers weigh less (a length bias).
  "seq-mean-token-sum-norm" sum_{b,l} m * loss_tok / D,          D = B * L
        Dr. GRPO: a constant normaliser (pass D = global sequences * max generation length), no
        length bias and no dependence on how many tokens a batch happens to hold.
`denominator` (a positive number or a 1-element tensor, e.g. the global token count summed over
micro-batches and data-parallel ranks) replaces D. With a global D the micro-batch losses and
gradients sum exactly to the full-batch ones (gradient accumulation without rescaling).

Metrics (0-dim detached tensors; over the masked tokens of THIS call, N = sum m;
every mean is a mask-weighted mean, 0 when N = 0; the ratio statistics are 1 when N = 0)
------------------------------------------------------------------------------------------
  clipfrac_low   fraction with A < 0 and ratio < 1 - clip_low   (lower clip active, grad 0)
  clipfrac_high  fraction with A > 0 and ratio > 1 + clip_high  (upper clip active, grad 0)
  clipfrac_dual  fraction with A < 0 and ratio > dual_clip       (dual clip active, grad 0;
                 always 0 without dual_clip).  The three sets are disjoint.
  approx_kl      mean of (old_logprobs - logprobs): the k1 estimate of KL(pi_old || pi_theta)
                 (raw, unclamped log-ratio); verl's `ppo_kl`.
  ratio_mean / ratio_min / ratio_max   of ratio (with the clamped log-ratio) over tokens m != 0
  pg_loss        mean of pg (the surrogate alone)
  kl             mean of the chosen kl_type value (only when ref_logprobs is given)
  entropy        mean of entropy (only when entropy is given)
Masked-out positions may hold anything (even inf / nan): they are never read into a result.

Saved for the backward (Triton): one fp32 [B, L] coefficient (masked d loss_tok / d logprob,
KL part included), the mask and the [B] row weights; the backward is not itself differentiable.
Metrics are local to the call (average them, or their sums, across micro-batches / ranks yourself).

Backends: `backend=None` picks "triton" where it is compiled (CUDA tensors), else "torch".
`backend="triton"` also runs on CPU tensors through Triton's interpreter (`TRITON_INTERPRET=1`
set before Triton was first imported): that checks the kernel, at several times the torch
backend's time, so it is never chosen by default.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from .options import AGGS, BACKENDS, KL_TYPES

LOG_RATIO_CLAMP = 20.0

__all__ = ["policy_loss", "kl_estimate", "row_weights", "AGGS", "KL_TYPES", "BACKENDS",
           "triton_available"]


# ----------------------------------------------------------------------------- validation

def _check_float(name, value, *, lo=None, lo_open=False, hi=None, hi_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return float(value)


def _check_tensor(name, t, shape, device, *, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} "
                         f"(the [B, L] shape of logprobs)" if len(shape) == 2 else
                         f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, logprobs on {device}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def _validate(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
              dual_clip, kl_coef, kl_type, entropy, entropy_coef, agg, denominator, backend):
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"logprobs must be a torch.Tensor, got {type(logprobs).__name__}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, L], got shape {tuple(logprobs.shape)}")
    if not logprobs.is_floating_point():
        raise TypeError(f"logprobs must be a floating tensor, got {logprobs.dtype}")
    B, L = logprobs.shape
    if B == 0 or L == 0:
        raise ValueError(f"logprobs must be non-empty, got shape {(B, L)}")
    dev = logprobs.device
    _check_tensor("old_logprobs", old_logprobs, (B, L), dev)
    if not isinstance(advantages, torch.Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if tuple(advantages.shape) not in ((B,), (B, L)):
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({B},) "
                         f"(per sequence) or ({B}, {L}) (per token)")
    _check_tensor("advantages", advantages, advantages.shape, dev)
    _check_tensor("mask", mask, (B, L), dev, floating=False)
    if mask.is_complex():
        raise TypeError(f"mask must be bool or real, got {mask.dtype}")
    if ref_logprobs is not None:
        _check_tensor("ref_logprobs", ref_logprobs, (B, L), dev)
    if entropy is not None:
        _check_tensor("entropy", entropy, (B, L), dev)

    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {AGGS}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown kl_type {kl_type!r}; expected one of {KL_TYPES}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected None or one of {BACKENDS}")
    clip_low = _check_float("clip_low", clip_low, lo=0.0, hi=1.0, hi_open=True)
    clip_high = _check_float("clip_high", clip_high, lo=0.0)
    if dual_clip is not None:
        dual_clip = _check_float("dual_clip", dual_clip, lo=1.0, lo_open=True)
    kl_coef = _check_float("kl_coef", kl_coef)
    entropy_coef = _check_float("entropy_coef", entropy_coef)
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy")

    if denominator is not None:
        if isinstance(denominator, torch.Tensor):
            if denominator.numel() != 1 or denominator.is_complex():
                raise ValueError("denominator tensor must hold one real value, got shape "
                                 f"{tuple(denominator.shape)} dtype {denominator.dtype}")
            if denominator.device.type == "cpu" and not float(denominator.detach()) > 0:
                raise ValueError(f"denominator must be > 0, got {float(denominator.detach())}")
        else:
            _check_float("denominator", denominator, lo=0.0, lo_open=True)
    return clip_low, clip_high, dual_clip, kl_coef, entropy_coef


def triton_available(device: torch.device | None = None) -> bool:
    """Whether the Triton backend can run on `device`: CUDA tensors with a CUDA build, or any
    tensors when Triton runs through its interpreter (`TRITON_INTERPRET=1`)."""
    try:
        from triton import knobs
    except ImportError:
        return False
    if knobs.runtime.interpret:
        return True
    if device is None:
        return torch.cuda.is_available()
    return device.type == "cuda" and torch.cuda.is_available()


# ----------------------------------------------------------------------------- shared pieces

def _row_scale(agg, n_b, B, L, denominator, dtype):
    """Aggregation weight of every row: loss = sum_b scale_b * sum_l m[b, l] * loss_tok[b, l]."""
    if denominator is not None:
        D = torch.as_tensor(denominator, dtype=dtype, device=n_b.device).detach().reshape(())
    if agg == "token-mean":
        if denominator is None:
            n = n_b.sum()
            D = torch.where(n > 0, n, torch.ones_like(n))
        return (1.0 / D).expand(B)
    if agg == "seq-mean-token-mean":
        if denominator is None:
            D = torch.tensor(float(B), dtype=dtype, device=n_b.device)
        return 1.0 / (torch.where(n_b > 0, n_b, torch.ones_like(n_b)) * D)
    if denominator is None:
        D = torch.tensor(float(B * L), dtype=dtype, device=n_b.device)
    return (1.0 / D).expand(B)


def _metrics(n, sums: dict, rmin, rmax, *, has_dual, has_kl, has_ent):
    """Metric dict from global (masked, weighted) sums; see the module docstring."""
    nz = n > 0
    denom = torch.where(nz, n, torch.ones_like(n))
    one = torch.ones_like(n)

    def mean(s):
        return torch.where(nz, s / denom, torch.zeros_like(n))

    out = {
        "clipfrac_low": mean(sums["low"]),
        "clipfrac_high": mean(sums["high"]),
        "clipfrac_dual": mean(sums["dual"]) if has_dual else torch.zeros_like(n),
        "approx_kl": mean(sums["neg_log_r"]),
        "ratio_mean": torch.where(nz, sums["ratio"] / denom, one),
        "ratio_min": torch.where(nz, rmin, one),
        "ratio_max": torch.where(nz, rmax, one),
        "pg_loss": mean(sums["pg"]),
    }
    if has_kl:
        out["kl"] = mean(sums["kl"])
    if has_ent:
        out["entropy"] = mean(sums["ent"])
    return {k: v.detach() for k, v in out.items()}


def _k3_and_expm1_torch(x):
    """(exp(x) - x - 1, exp(x) - 1) without cancellation near 0: Taylor series to x^17 / 17! for
    |x| < 1/2 (truncation < 1e-20 relative, so also exact in float64), direct formulas above."""
    p = torch.full_like(x, 1.0 / math.factorial(17))
    for k in range(16, 1, -1):
        p = p * x + 1.0 / math.factorial(k)
    k3_small = x * x * p
    small = x.abs() < 0.5
    e = torch.exp(x)
    return torch.where(small, k3_small, e - x - 1.0), torch.where(small, x + k3_small, e - 1.0)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled tokens (k1, k2 or k3, exactly
    the kernel's formulas; differentiable in torch)."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown kl_type {kl_type!r}; expected one of {KL_TYPES}")
    d = logprobs - ref_logprobs
    if kl_type == "k1":
        return d
    if kl_type == "k2":
        return 0.5 * d * d
    return _k3_and_expm1_torch((-d).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))[0]


def row_weights(agg: str, mask: torch.Tensor, denominator=None) -> torch.Tensor:
    """[B] weights w_b of the aggregation `agg`: loss = sum_b w_b * sum_l mask * loss_tok, the
    same rule `policy_loss` applies (for losses built outside the kernel on its conventions)."""
    if agg not in AGGS:
        raise ValueError(f"unknown agg {agg!r}; expected one of {AGGS}")
    B, L = mask.shape
    dt = torch.float64
    n_b = torch.where(mask != 0, mask.to(dt), torch.zeros((), dtype=dt, device=mask.device)).sum(1)
    return _row_scale(agg, n_b, B, L, denominator, dt)


# ----------------------------------------------------------------------------- torch backend

def _policy_loss_torch(lp, old, adv, mask, ref, ent, clip_low, clip_high, dual_clip, kl_coef,
                       kl_type, entropy_coef, agg, denominator):
    B, L = lp.shape
    dt = torch.promote_types(lp.dtype, torch.float32)
    active = mask != 0
    m = torch.where(active, mask.to(dt), torch.zeros((), dtype=dt, device=lp.device))
    zero = torch.zeros((), dtype=dt, device=lp.device)

    def clean(t):   # masked-out positions may hold inf/nan: replace them before any arithmetic
        return torch.where(active, t.to(dt), zero)

    lp_ = clean(lp)
    old_ = clean(old)
    A = clean(adv if adv.dim() == 2 else adv[:, None].expand(B, L))

    log_r = lp_ - old_
    ratio = torch.exp(log_r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg = torch.maximum(-A * ratio, -A * ratio.clamp(1.0 - clip_low, 1.0 + clip_high))
    if dual_clip is not None:
        pg = torch.where(A < 0, torch.minimum(pg, -A * dual_clip), pg)
    loss_tok = pg
    sums = {}
    if ref is not None:
        kl = kl_estimate(lp_, clean(ref), kl_type)
        loss_tok = loss_tok + kl_coef * kl
        sums["kl"] = (m * kl).sum().detach()
    if ent is not None:
        ent_ = clean(ent)
        loss_tok = loss_tok - entropy_coef * ent_
        sums["ent"] = (m * ent_).sum().detach()

    n_b = m.sum(1)
    scale = _row_scale(agg, n_b, B, L, denominator, dt)
    loss = (scale * (m * loss_tok).sum(1)).sum()

    with torch.no_grad():
        r = ratio.detach()
        sums["low"] = (m * ((A < 0) & (r < 1.0 - clip_low))).sum()
        sums["high"] = (m * ((A > 0) & (r > 1.0 + clip_high))).sum()
        if dual_clip is not None:
            sums["dual"] = (m * ((A < 0) & (r > dual_clip))).sum()
        sums["neg_log_r"] = (m * -log_r.detach()).sum()
        sums["ratio"] = (m * r).sum()
        sums["pg"] = (m * pg.detach()).sum()
        inf = torch.tensor(float("inf"), dtype=dt, device=lp.device)
        rmin = torch.where(active, r, inf).min()
        rmax = torch.where(active, r, -inf).max()
        metrics = _metrics(n_b.sum(), sums, rmin, rmax, has_dual=dual_clip is not None,
                           has_kl=ref is not None, has_ent=ent is not None)
    return loss, metrics


# ----------------------------------------------------------------------------- triton backend

class _PolicyLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, ent, old, adv, mask, ref, denominator, cfg):
        import triton

        from . import _policy_loss_triton as K

        clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, agg = cfg
        B, L = lp.shape
        dev = lp.device
        lp = lp.contiguous()
        old = old.contiguous()
        adv = adv.contiguous()
        mask = mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        ref = ref.contiguous() if ref is not None else None
        ent = ent.contiguous() if ent is not None else None

        store_coef = ctx.needs_input_grad[0]
        BLOCK = K.block_size(L)
        NB = triton.cdiv(L, BLOCK)
        stats = torch.zeros((K.N_STATS, B, NB), dtype=torch.float32, device=dev)
        coef = torch.empty((B, L), dtype=torch.float32, device=dev) if store_coef else stats
        K._policy_loss_fwd_kernel[(B, NB)](
            lp, old, adv, mask, ref if ref is not None else lp, ent if ent is not None else lp,
            coef, stats, kl_coef, B, L, NB,
            lp.stride(0), old.stride(0), adv.stride(0), mask.stride(0),
            ref.stride(0) if ref is not None else 0, ent.stride(0) if ent is not None else 0,
            CLIP_LO=clip_low, CLIP_HI=clip_high,
            HAS_DUAL=dual_clip is not None, DUAL_C=dual_clip if dual_clip is not None else 0.0,
            ADV_PER_TOKEN=adv.dim() == 2, HAS_REF=ref is not None,
            KL_TYPE=K.KL_TYPES[kl_type], HAS_ENT=ent is not None, STORE_COEF=store_coef,
            LR_CLAMP=LOG_RATIO_CLAMP, BLOCK_L=BLOCK,
        )
        # [B]-sized and scalar reductions in float64 (tiny tensors)
        s = stats[: K.ST_RMIN].double().sum(-1)              # [ST_RMIN, B]
        n_b = s[K.ST_CNT]
        scale = _row_scale(agg, n_b, B, L, denominator, torch.float64)
        row = s[K.ST_PG] + kl_coef * s[K.ST_KL] - entropy_coef * s[K.ST_ENT]
        loss = (scale * row).sum().to(torch.promote_types(lp.dtype, torch.float32))
        tot = s.sum(-1)
        extra = torch.stack([stats[K.ST_RMIN].amin().double(), stats[K.ST_RMAX].amax().double()])
        ctx.save_for_backward(coef if store_coef else None, mask, scale.float().contiguous())
        ctx.mark_non_differentiable(tot, extra)
        ctx.ent_coef = entropy_coef
        ctx.shape = (B, L)
        ctx.lp_dtype = lp.dtype
        ctx.ent_dtype = ent.dtype if ent is not None else None
        return loss, tot, extra

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _g_tot, _g_extra):
        from . import _policy_loss_triton as K
        import triton

        coef, mask, scale = ctx.saved_tensors
        B, L = ctx.shape
        need_lp, need_ent = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_lp or need_ent):
            return (None,) * 8
        dev = scale.device
        gout = g_loss.detach().reshape(1).to(torch.float32).contiguous()
        glp = torch.empty((B, L), dtype=ctx.lp_dtype, device=dev) if need_lp else None
        gent = torch.empty((B, L), dtype=ctx.ent_dtype, device=dev) if need_ent else None
        BLOCK = K.block_size(L)
        K._policy_loss_bwd_kernel[(B, triton.cdiv(L, BLOCK))](
            coef if need_lp else scale, mask, scale, gout,
            glp if need_lp else scale, gent if need_ent else scale,
            ctx.ent_coef, L, mask.stride(0),
            HAS_GLP=need_lp, HAS_GENT=need_ent, BLOCK_L=BLOCK,
        )
        return glp, gent, None, None, None, None, None, None


def _policy_loss_triton(lp, old, adv, mask, ref, ent, clip_low, clip_high, dual_clip, kl_coef,
                        kl_type, entropy_coef, agg, denominator):
    from . import _policy_loss_triton as K

    cfg = (clip_low, clip_high, dual_clip, kl_coef, kl_type, entropy_coef, agg)
    loss, tot, extra = _PolicyLossTriton.apply(lp, ent, old, adv, mask, ref, denominator, cfg)
    dt = torch.promote_types(lp.dtype, torch.float32)
    tot = tot.to(dt)
    extra = extra.to(dt)
    sums = {"pg": tot[K.ST_PG], "kl": tot[K.ST_KL], "ent": tot[K.ST_ENT], "low": tot[K.ST_LOW],
            "high": tot[K.ST_HIGH], "dual": tot[K.ST_DUAL], "neg_log_r": tot[K.ST_LOGR],
            "ratio": tot[K.ST_RSUM]}
    metrics = _metrics(tot[K.ST_CNT], sums, extra[0], extra[1], has_dual=dual_clip is not None,
                       has_kl=ref is not None, has_ent=ent is not None)
    return loss, metrics


# ----------------------------------------------------------------------------- public API

def policy_loss(logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, clip_low=0.2,
                clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_type="k3", entropy=None,
                entropy_coef=0.0, agg="token-mean", denominator=None, backend=None):
    """Clipped policy-gradient loss with optional dual clip, KL penalty and entropy bonus.

    Args:
        logprobs: [B, L] log pi_theta(token) (differentiable).
        old_logprobs: [B, L] log-probs of the behaviour / rollout policy (constant).
        advantages: [B] (per sequence) or [B, L] (per token) (constant).
        mask: [B, L] 0/1 (bool or numeric) response-token mask.
        ref_logprobs: [B, L] reference-policy log-probs for the KL term/metric, or None.
        clip_low / clip_high: ratio clip range [1 - clip_low, 1 + clip_high]; 0 <= clip_low < 1,
            clip_high >= 0 (clip_high > clip_low is DAPO's clip-higher).
        dual_clip: None, or c > 1: for A < 0 the loss is capped at -A * c.
        kl_coef, kl_type: weight and estimator ("k1", "k2", "k3") of the KL to ref_logprobs.
        entropy, entropy_coef: [B, L] per-token entropy (differentiable) and its bonus weight.
        agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm".
        denominator: optional positive number or 1-element tensor replacing the local normaliser
            (e.g. the global token count over micro-batches and DP ranks).
        backend: None (auto), "triton" or "torch".

    Returns:
        (loss, metrics): a 0-dim loss (fp32, or fp64 for fp64 inputs) and a dict of 0-dim detached
        tensors; see the module docstring for the exact definitions.
    """
    clip_low, clip_high, dual_clip, kl_coef, entropy_coef = _validate(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, dual_clip,
        kl_coef, kl_type, entropy, entropy_coef, agg, denominator, backend)
    if backend is None:
        backend = ("triton" if logprobs.device.type == "cuda" and triton_available(logprobs.device)
                   else "torch")
    elif backend == "triton" and not triton_available(logprobs.device):
        raise RuntimeError(f"backend='triton' cannot run on {logprobs.device}: needs Triton with "
                           "CUDA tensors, or TRITON_INTERPRET=1 (set before importing triton); "
                           "use backend='torch'")
    fn = _policy_loss_triton if backend == "triton" else _policy_loss_torch
    return fn(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, clip_low,
              clip_high, dual_clip, kl_coef, kl_type, entropy_coef, agg, denominator)
