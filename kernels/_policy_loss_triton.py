"""Triton kernels for `policy_loss` (see `policy_loss.py` for the maths and the public API).

Imported lazily by `policy_loss.py`, only when the Triton backend is used: `triton.jit` decides
at decoration time whether it runs compiled or through the interpreter (`TRITON_INTERPRET=1`).

Forward, one program per (row b, block of BLOCK_L tokens), one read of every input:
  per token   ratio, PPO/dual-clip surrogate, KL to ref, d loss_tok / d logprob (stored, masked)
  per program partial sums of the masked statistics, written to stats[STAT, b, block] (rows the
              configuration does not compute -- KL, entropy, dual clip -- stay as allocated, 0)
Backward, same grid, one read of the stored coefficient (and the mask when the entropy needs a
gradient):  grad_lp = upstream * row_scale[b] * coef;  grad_ent = -entropy_coef * upstream *
row_scale[b] * mask.

All arithmetic is fp32 (inputs of any float dtype are upcast on load; bf16 math is also not
supported by the interpreter). Clip bounds are `tl.constexpr` (fixed per run; a Python float
passed as a runtime argument would become fp64 under Inductor, Liger #1366); the KL and entropy
coefficients are runtime fp32 arguments so a schedule does not recompile the kernel.
"""
import triton
import triton.language as tl

# Rows of the statistics buffer written by the forward kernel (host-side ints; the kernel reads
# the tl.constexpr copies: compiled Triton only allows constexpr globals in @jit functions).
ST_PG, ST_KL, ST_ENT, ST_CNT, ST_LOW, ST_HIGH, ST_DUAL, ST_LOGR, ST_RSUM, ST_RMIN, ST_RMAX = range(11)
N_STATS = 11
_PG, _KL, _ENT, _CNT, _LOW, _HIGH, _DUAL, _LOGR, _RSUM, _RMIN, _RMAX = (
    tl.constexpr(i) for i in range(N_STATS))

KL_TYPES = {"k1": 1, "k2": 2, "k3": 3}
LOG_RATIO_CLAMP = 20.0


@triton.jit
def _expm1_and_k3(x):
    """(exp(x) - 1, exp(x) - x - 1) without cancellation: a degree-9 Taylor series for |x| < 1/2
    (truncation < 1e-9 relative), the direct formulas above (relative error < 1e-6 there)."""
    p = 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    k3_small = x * x * p
    small = tl.abs(x) < 0.5
    e = tl.exp(x)
    em1 = tl.where(small, x + k3_small, e - 1.0)
    k3 = tl.where(small, k3_small, e - x - 1.0)
    return em1, k3


@triton.jit
def _policy_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr,   # inputs, rows contiguous
    coef_ptr, stats_ptr,                                     # outputs
    kl_coef,                                                 # runtime fp32
    B, L, NB,
    stride_lp, stride_old, stride_adv, stride_mask, stride_ref, stride_ent,
    CLIP_LO: tl.constexpr, CLIP_HI: tl.constexpr,
    HAS_DUAL: tl.constexpr, DUAL_C: tl.constexpr,
    ADV_PER_TOKEN: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
    HAS_ENT: tl.constexpr, STORE_COEF: tl.constexpr, LR_CLAMP: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    inb = offs < L

    m = tl.load(mask_ptr + b * stride_mask + offs, mask=inb, other=0).to(tl.float32)
    active = inb & (m != 0.0)
    lp = tl.load(lp_ptr + b * stride_lp + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + b * stride_old + offs, mask=inb, other=0.0).to(tl.float32)
    if ADV_PER_TOKEN:
        adv = tl.load(adv_ptr + b * stride_adv + offs, mask=inb, other=0.0).to(tl.float32)
    else:
        adv = tl.load(adv_ptr + b * stride_adv).to(tl.float32) + tl.zeros([BLOCK_L], tl.float32)

    # ratio, with the log-ratio clamped to +-LR_CLAMP (gradient 0 outside, like torch.clamp)
    log_r = lp - old
    lr_in = (log_r >= -LR_CLAMP) & (log_r <= LR_CLAMP)
    ratio = tl.exp(tl.minimum(tl.maximum(log_r, -LR_CLAMP), LR_CLAMP))

    # PPO clip: pg = max(-A r, -A clip(r)); the clipped branch wins strictly only when
    # A > 0 and r > 1 + clip_high, or A < 0 and r < 1 - clip_low (there its gradient is 0).
    hi_act = (adv > 0.0) & (ratio > 1.0 + CLIP_HI)
    lo_act = (adv < 0.0) & (ratio < 1.0 - CLIP_LO)
    r_clip = tl.minimum(tl.maximum(ratio, 1.0 - CLIP_LO), 1.0 + CLIP_HI)
    pg = tl.maximum(-adv * ratio, -adv * r_clip)
    live = ~(hi_act | lo_act)
    if HAS_DUAL:
        # dual clip for A < 0: pg = min(pg, -A c), active (gradient 0) iff r > c
        du_act = (adv < 0.0) & (ratio > DUAL_C)
        pg = tl.where(du_act, -adv * DUAL_C, pg)
        live = live & ~du_act
        tl.store(stats_ptr + (_DUAL * B + b) * NB + blk, tl.sum(tl.where(active & du_act, m, 0.0)))
    coef = tl.where(live & lr_in, -adv * ratio, 0.0)

    if HAS_REF:
        ref = tl.load(ref_ptr + b * stride_ref + offs, mask=inb, other=0.0).to(tl.float32)
        d = lp - ref
        if KL_TYPE == 1:
            kl = d
            dkl = tl.full([BLOCK_L], 1.0, tl.float32)
        elif KL_TYPE == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            # k3 = exp(x) - x - 1 with x = ref - lp clamped to +-LR_CLAMP; d k3 / d lp = -expm1(x)
            x_in = (d >= -LR_CLAMP) & (d <= LR_CLAMP)
            x = tl.minimum(tl.maximum(-d, -LR_CLAMP), LR_CLAMP)
            em1, kl = _expm1_and_k3(x)
            dkl = tl.where(x_in, -em1, 0.0)
        coef += kl_coef * dkl
        tl.store(stats_ptr + (_KL * B + b) * NB + blk, tl.sum(tl.where(active, m * kl, 0.0)))
    if HAS_ENT:
        ent = tl.load(ent_ptr + b * stride_ent + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(stats_ptr + (_ENT * B + b) * NB + blk, tl.sum(tl.where(active, m * ent, 0.0)))

    if STORE_COEF:
        tl.store(coef_ptr + b * L + offs, tl.where(active, m * coef, 0.0), mask=inb)

    zero = tl.zeros([BLOCK_L], tl.float32)
    base = stats_ptr + b * NB + blk
    BNB = B * NB
    tl.store(base + _PG * BNB, tl.sum(tl.where(active, m * pg, zero)))
    tl.store(base + _CNT * BNB, tl.sum(m))
    tl.store(base + _LOW * BNB, tl.sum(tl.where(active & lo_act, m, zero)))
    tl.store(base + _HIGH * BNB, tl.sum(tl.where(active & hi_act, m, zero)))
    tl.store(base + _LOGR * BNB, tl.sum(tl.where(active, -m * log_r, zero)))
    tl.store(base + _RSUM * BNB, tl.sum(tl.where(active, m * ratio, zero)))
    tl.store(base + _RMIN * BNB, tl.min(tl.where(active, ratio, float("inf")), axis=0))
    tl.store(base + _RMAX * BNB, tl.max(tl.where(active, ratio, -float("inf")), axis=0))


@triton.jit
def _policy_loss_bwd_kernel(
    coef_ptr, mask_ptr, row_scale_ptr, gout_ptr,
    glp_ptr, gent_ptr,
    ent_coef,                                                # runtime fp32
    L, stride_mask,
    HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK_L + tl.arange(0, BLOCK_L)
    inb = offs < L
    scale = tl.load(gout_ptr).to(tl.float32) * tl.load(row_scale_ptr + b).to(tl.float32)
    if HAS_GLP:
        c = tl.load(coef_ptr + b * L + offs, mask=inb, other=0.0)
        tl.store(glp_ptr + b * L + offs, (scale * c).to(glp_ptr.dtype.element_ty), mask=inb)
    if HAS_GENT:
        m = tl.load(mask_ptr + b * stride_mask + offs, mask=inb, other=0).to(tl.float32)
        g = tl.where(m != 0.0, -ent_coef * scale * m, 0.0)
        tl.store(gent_ptr + b * L + offs, g.to(gent_ptr.dtype.element_ty), mask=inb)


def block_size(L: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(L)))
