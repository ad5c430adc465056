"""policy_loss (kernels/policy_loss.py): both backends vs a float64 reference written here from
the formulas. Without a GPU, Triton runs through its CPU interpreter; with one, the kernels run
compiled on CUDA copies of the inputs (the reference stays on the CPU in float64)."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton

import pytest  # noqa: E402

from eureka_megatron.kernels.policy_loss import AGGS, KL_TYPES, policy_loss  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

BACKENDS = ["torch", "triton"]
CLIP_LOW, CLIP_HIGH, DUAL = 0.2, 0.28, 3.0
RTOL = 1e-5


# ----------------------------------------------------------------------------- reference (fp64)

def reference(lp, old, adv, mask, *, ref=None, ent=None, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
              dual_clip=None, kl_coef=0.0, kl_type="k3", entropy_coef=0.0, agg="token-mean",
              denominator=None):
    """Straight from the formulas, in float64; returns (loss, metrics, grad_lp, grad_ent)."""
    B, L = lp.shape
    lp = lp.detach().double().requires_grad_()
    ent = ent.detach().double().requires_grad_() if ent is not None else None
    old = old.double()
    m = mask.double()
    A = adv.double() if adv.dim() == 2 else adv.double()[:, None].expand(B, L)
    ratio = torch.exp(lp - old)
    surr = torch.stack([-A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high)]).amax(0)
    if dual_clip is not None:
        surr = torch.where(A < 0, torch.minimum(surr, -A * dual_clip), surr)
    tok = surr
    if ref is not None:
        r = ref.double()
        kl = {"k1": lp - r, "k2": (lp - r) ** 2 / 2,
              "k3": torch.exp(r - lp) - (r - lp) - 1}[kl_type]
        tok = tok + kl_coef * kl
    if ent is not None:
        tok = tok - entropy_coef * ent
    n_b = m.sum(1)
    if agg == "token-mean":
        loss = (m * tok).sum() / (denominator if denominator is not None else max(n_b.sum(), 1))
    elif agg == "seq-mean-token-mean":
        seq = (m * tok).sum(1) / n_b.clamp(min=1)
        loss = seq.sum() / (denominator if denominator is not None else B)
    else:
        loss = (m * tok).sum() / (denominator if denominator is not None else B * L)
    grads = torch.autograd.grad(loss, [lp] + ([ent] if ent is not None else []))

    with torch.no_grad():
        on = m != 0
        N = m.sum()
        mean = lambda x: (m * x).sum() / N  # noqa: E731
        r_ = ratio[on]
        met = {
            "clipfrac_low": mean(((A < 0) & (ratio < 1 - clip_low)).double()),
            "clipfrac_high": mean(((A > 0) & (ratio > 1 + clip_high)).double()),
            "clipfrac_dual": (mean(((A < 0) & (ratio > dual_clip)).double())
                              if dual_clip is not None else torch.tensor(0.0)),
            "approx_kl": mean(old - lp),
            "ratio_mean": mean(ratio), "ratio_min": r_.min(), "ratio_max": r_.max(),
            "pg_loss": mean(surr),
        }
        if ref is not None:
            met["kl"] = mean(kl)
        if ent is not None:
            met["entropy"] = mean(ent)
    return (loss.detach(), {k: float(v) for k, v in met.items()}, grads[0],
            grads[1] if ent is not None else None)


def make_case(B=3, L=37, *, token_adv=False, seed=0, zero_row=1):
    """Log-ratios in [-1.6, 1.6] (ratios 0.2..5: both clip sides and the dual clip at 3),
    kept 1e-3 away from every clip boundary so fp32 and fp64 agree on which branch is active;
    columns 1-3 are set to hit the dual clip, the low clip and the high clip."""
    g = torch.Generator().manual_seed(seed)
    old = -0.05 - 3.0 * torch.rand(B, L, generator=g, dtype=torch.float64)
    log_r = (torch.rand(B, L, generator=g, dtype=torch.float64) * 2 - 1) * 1.6
    for bound in (1 - CLIP_LOW, 1 + CLIP_HIGH, DUAL):
        near = (log_r - math.log(bound)).abs() < 1e-3
        log_r = torch.where(near, log_r + 3e-3, log_r)
    if L >= 4:
        log_r[:, 1:4] = torch.tensor([1.3, -1.0, 0.8], dtype=torch.float64)  # dual / low / high
    lp = (old + log_r).float()
    ref = (old + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)).float()
    ent = (2.0 * torch.rand(B, L, generator=g, dtype=torch.float64)).float()
    if token_adv:
        adv = torch.randn(B, L, generator=g).float()
        adv[:, ::7] = 0.0
        if L >= 4:
            adv[:, 1:4] = torch.tensor([-0.7, -0.5, 0.6])
    else:
        adv = torch.tensor(([0.9, -0.6, -1.3, 0.4, -0.2, 1.1, -0.8] * (B // 7 + 1))[:B])
    mask = torch.rand(B, L, generator=g) > 0.25
    if L >= 4:
        mask[:, 1:4] = True
    if zero_row is not None:
        mask[zero_row] = False
    return lp, old.float(), adv, mask, ref, ent


def close(actual, expected, what, rtol=RTOL, atol_frac=1e-6):
    """Scalars: |a - e| <= rtol * |e|. Tensors, elementwise: |a - e| <= rtol * |e| + atol_frac *
    max|e| (the atol covers fp32 cancellation in elements near 0, e.g. -A r + kl_coef * dk3)."""
    a = torch.as_tensor(actual).double()
    e = torch.as_tensor(expected).double()
    atol = atol_frac * e.abs().max().item() if e.dim() else 0.0
    err = (a - e).abs() - (rtol * e.abs() + atol)
    assert err.max().item() <= 0, (
        f"{what}: max abs error {(a - e).abs().max().item():.3e} (expected max "
        f"{e.abs().max().item():.3e})")


def run(backend, lp, old, adv, mask, ref=None, ent=None, **kw):
    """policy_loss on DEVICE copies; (loss, metrics, grad_lp, grad_ent) back on the CPU."""
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    lp = dev(lp).clone().requires_grad_()
    ent = dev(ent).clone().requires_grad_() if ent is not None else None
    kw = {"clip_low": CLIP_LOW, "clip_high": CLIP_HIGH, **kw}
    if isinstance(kw.get("denominator"), torch.Tensor):
        kw["denominator"] = dev(kw["denominator"])
    loss, met = policy_loss(lp, dev(old), dev(adv), dev(mask), ref_logprobs=dev(ref), entropy=ent,
                            backend=backend, **kw)
    grads = torch.autograd.grad(loss, [lp] + ([ent] if ent is not None else []))
    return (loss.detach().cpu(), {k: v.cpu() for k, v in met.items()}, grads[0].cpu(),
            grads[1].cpu() if ent is not None else None)


def check_against_reference(backend, case, **kw):
    lp, old, adv, mask, ref, ent = case
    loss, met, g_lp, g_ent = run(backend, lp, old, adv, mask, ref=ref, ent=ent, **kw)
    r_loss, r_met, r_glp, r_gent = reference(lp, old, adv, mask, ref=ref, ent=ent, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    close(loss, r_loss, "loss")
    assert set(met) == set(r_met), (sorted(met), sorted(r_met))
    for k, v in r_met.items():
        close(float(met[k]), v, f"metric {k}")
    assert g_lp.dtype == lp.dtype
    close(g_lp, r_glp, "grad logprobs")
    if ent is not None:
        close(g_ent, r_gent, "grad entropy")
    return met


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("token_adv", [False, True], ids=["adv[B]", "adv[B,L]"])
@pytest.mark.parametrize("dual", [None, DUAL], ids=["nodual", "dual"])
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("agg", AGGS)
def test_matches_fp64_reference(agg, kl_type, dual, token_adv):
    case = make_case(token_adv=token_adv, seed=3 * AGGS.index(agg) + KL_TYPES.index(kl_type))
    for backend in BACKENDS:
        met = check_against_reference(backend, case, agg=agg, kl_type=kl_type, dual_clip=dual,
                                      kl_coef=0.05, entropy_coef=0.01)
        assert met["clipfrac_low"] > 0 and met["clipfrac_high"] > 0
        assert (met["clipfrac_dual"] > 0) == (dual is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_ref_or_entropy(backend):
    lp, old, adv, mask, _, _ = make_case(B=5, L=19, seed=3, zero_row=None)
    met = check_against_reference(backend, (lp, old, adv, mask.float(), None, None),
                                  agg="seq-mean-token-mean", clip_low=0.1, clip_high=0.3)
    assert "kl" not in met and "entropy" not in met


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_blocks_per_row(backend):
    # L above the kernel's 1024-token block: per-block partial sums and min/max merge in torch.
    case = make_case(B=2, L=1100, token_adv=True, seed=5, zero_row=None)
    check_against_reference(backend, case, agg="seq-mean-token-mean", kl_type="k3",
                            dual_clip=DUAL, kl_coef=0.1, entropy_coef=0.02)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_micro_batches_with_global_denominator(backend, agg):
    lp, old, adv, mask, ref, ent = make_case(B=5, L=23, seed=11, zero_row=2)
    B, L = lp.shape
    kw = dict(agg=agg, kl_type="k2", dual_clip=DUAL, kl_coef=0.1, entropy_coef=0.01)
    full, _, g_full, ge_full = run(backend, lp, old, adv, mask, ref, ent, **kw)
    denom = {"token-mean": torch.tensor(float(mask.sum())),     # a tensor (no host sync)
             "seq-mean-token-mean": B, "seq-mean-token-sum-norm": B * L}[agg]
    parts = [slice(0, 2), slice(2, 5)]
    outs = [run(backend, lp[s], old[s], adv[s], mask[s], ref[s], ent[s], denominator=denom, **kw)
            for s in parts]
    close(outs[0][0] + outs[1][0], full, "summed micro-batch loss")
    close(torch.cat([o[2] for o in outs]), g_full, "micro-batch grad logprobs")
    close(torch.cat([o[3] for o in outs]), ge_full, "micro-batch grad entropy")
    # and each micro-batch against the reference with the same denominator
    for s in parts:
        r = reference(lp[s], old[s], adv[s], mask[s], ref=ref[s], ent=ent[s],
                      denominator=float(denom), **kw)
        o = run(backend, lp[s], old[s], adv[s], mask[s], ref[s], ent[s], denominator=denom, **kw)
        close(o[0], r[0], "micro-batch loss")
        close(o[2], r[2], "micro-batch grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_ratio_is_one(backend):
    lp, _, adv, mask, ref, ent = make_case(seed=7, token_adv=True)
    loss, met, g_lp, _ = run(backend, lp, lp.clone(), adv, mask, ref, ent, dual_clip=DUAL,
                             kl_coef=0.1)
    for k in ("ratio_min", "ratio_max", "ratio_mean"):
        assert float(met[k]) == 1.0, (k, float(met[k]))
    for k in ("clipfrac_low", "clipfrac_high", "clipfrac_dual", "approx_kl"):
        assert float(met[k]) == 0.0, (k, float(met[k]))
    # unclipped everywhere: d loss / d lp = (-A + kl_coef * (1 - exp(ref - lp))) * m / N
    m = mask.double()
    expect = (-adv.double() - 0.1 * torch.expm1(ref.double() - lp.double())) * m / m.sum()
    close(g_lp, expect, "first-step grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_k3_of_close_policies_is_accurate(backend):
    # |ref - lp| from 1e-4 to 1.5, both signs: exp(x) - x - 1 in plain fp32 would lose up to all
    # digits to cancellation near 0; the series keeps 1e-5 relative on the KL and its gradient.
    B, L = 2, 40
    lp = -0.5 - torch.rand(B, L, generator=torch.Generator().manual_seed(1))
    x = torch.logspace(-4, math.log10(1.5), L).repeat(B, 1) * torch.tensor([[1.0], [-1.0]])
    ref = lp + x
    adv = torch.zeros(B)          # gradient = kl_coef * (1 - exp(ref - lp)) / N: the KL part only
    mask = torch.ones(B, L, dtype=torch.bool)
    loss, met, g, _ = run(backend, lp, lp, adv, mask, ref=ref, kl_coef=0.5, kl_type="k3")
    r = reference(lp, lp, adv, mask, ref=ref, kl_coef=0.5, kl_type="k3")
    close(float(met["kl"]), r[1]["kl"], "k3 metric")
    close(loss, r[0], "k3 loss")
    close(g, r[2], "k3 gradient", atol_frac=0.0)
    # per token through a one-token mask: every k3 value, the smallest ~5e-9
    for j in (0, 5, 13, 30):
        one = torch.zeros(B, L, dtype=torch.bool)
        one[0, j] = True
        m1 = run(backend, lp, lp, adv, one, ref=ref, kl_coef=0.5, kl_type="k3")[1]
        close(float(m1["kl"]), reference(lp, lp, adv, one, ref=ref, kl_type="k3")[1]["kl"],
              f"k3 at x={x[0, j].item():.1e}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_positions_may_hold_garbage(backend):
    lp, old, adv, mask, ref, ent = make_case(seed=9)
    kw = dict(ref=ref, ent=ent, dual_clip=DUAL, kl_coef=0.1, entropy_coef=0.01,
              agg="seq-mean-token-mean")
    clean = run(backend, lp, old, adv, mask, **kw)
    bad = ~mask
    dirty = [t.masked_fill(bad, v) for t, v in ((lp, float("-inf")), (old, float("nan")),
                                                (ref, float("inf")), (ent, float("nan")))]
    out = run(backend, dirty[0], dirty[1], adv, mask, ref=dirty[2], ent=dirty[3],
              **{k: v for k, v in kw.items() if k not in ("ref", "ent")})
    assert torch.equal(out[0], clean[0])
    assert torch.equal(out[2], clean[2]) and torch.equal(out[3], clean[3])
    assert all(math.isfinite(float(v)) for v in out[1].values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    lp, old, adv, mask, ref, ent = make_case(seed=13)
    lp16 = lp.bfloat16()
    loss, met, g, _ = run(backend, lp16, old.bfloat16(), adv, mask, ref.bfloat16(), None,
                          kl_coef=0.1)
    r = reference(lp16.float(), old.bfloat16().float(), adv, mask, ref=ref.bfloat16().float(),
                  kl_coef=0.1)
    assert loss.dtype == torch.float32 and g.dtype == torch.bfloat16
    close(loss, r[0], "bf16 loss")
    close(g.float(), r[2], "bf16 grad", rtol=1e-2, atol_frac=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_mask_and_entropy_only_gradient(backend):
    lp, old, adv, mask, ref, ent = make_case(seed=17)
    none = torch.zeros_like(mask)
    loss, met, g, ge = run(backend, lp, old, adv, none, ref, ent, kl_coef=0.1, entropy_coef=0.1,
                           agg="seq-mean-token-mean")
    assert float(loss.detach()) == 0.0 and not g.any() and not ge.any()
    assert all(float(met[k]) == 1.0 for k in ("ratio_min", "ratio_max", "ratio_mean"))
    assert all(float(v) == 0.0 for k, v in met.items() if not k.startswith("ratio"))
    # logprobs constant, entropy differentiable: d loss / d entropy = -entropy_coef * m / N
    e = ent.to(DEVICE).requires_grad_()
    loss, _ = policy_loss(lp.to(DEVICE), old.to(DEVICE), adv.to(DEVICE), mask.to(DEVICE),
                          entropy=e, entropy_coef=0.1, backend=backend)
    (ge,) = torch.autograd.grad(loss, [e])
    close(ge.cpu(), -0.1 * mask.double() / mask.sum(), "entropy-only gradient", atol_frac=0.0)


def test_torch_backend_is_exact_in_float64():
    lp, old, adv, mask, ref, ent = (t.double() if t.is_floating_point() else t
                                    for t in make_case(seed=19, token_adv=True))
    kw = dict(agg="seq-mean-token-mean", kl_type="k3", dual_clip=DUAL, kl_coef=0.1,
              entropy_coef=0.01)
    loss, met, g, ge = run("torch", lp, old, adv, mask, ref, ent, **kw)
    r = reference(lp, old, adv, mask, ref=ref, ent=ent, **kw)
    assert loss.dtype == torch.float64
    close(loss, r[0], "fp64 loss", rtol=1e-12)
    close(g, r[2], "fp64 grad", rtol=1e-12, atol_frac=1e-14)
    close(ge, r[3], "fp64 entropy grad", rtol=1e-12, atol_frac=0.0)
    for k, v in r[1].items():
        close(float(met[k]), v, f"fp64 metric {k}", rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_strided_inputs(backend):
    lp, old, adv, mask, ref, ent = make_case(B=1, L=1, seed=23, zero_row=None)
    mask[:] = True
    check_against_reference(backend, (lp, old, adv, mask, ref, ent), kl_coef=0.1,
                            entropy_coef=0.01, agg="seq-mean-token-mean")
    # non-contiguous views (every other column of a wider tensor, a transposed advantage)
    lp, old, adv, mask, ref, ent = make_case(B=4, L=22, token_adv=True, seed=29)
    view = lambda t: t[:, ::2]  # noqa: E731
    adv_t = adv.T.contiguous().T
    assert not view(lp).is_contiguous() and not adv_t.is_contiguous()
    check_against_reference(backend, (view(lp), view(old), view(adv_t), view(mask), view(ref),
                                      view(ent)), kl_coef=0.1, entropy_coef=0.01, dual_clip=DUAL)


def test_auto_backend_is_triton_where_compiled():
    """CUDA tensors: the Triton kernel; CPU tensors: torch, even where the interpreter could run
    the kernel (several times slower -- a check, not a default)."""
    lp, old, adv, mask, _, _ = (t.to(DEVICE) for t in make_case())
    loss, _ = policy_loss(lp.requires_grad_(), old, adv, mask)
    assert ("Triton" in loss.grad_fn.name()) == (DEVICE.type == "cuda")
    with torch.no_grad():   # no gradient requested: no coefficient stored, same loss
        loss2, _ = policy_loss(lp, old, adv, mask)
    assert torch.equal(loss.detach(), loss2)


def test_validation_errors():
    lp, old, adv, mask, ref, ent = make_case()
    B, L = lp.shape
    cases = [
        (dict(old_logprobs=old[:, :-1]), "old_logprobs has shape"),
        (dict(advantages=adv[:-1]), "advantages has shape"),
        (dict(mask=mask[:-1]), "mask has shape"),
        (dict(ref_logprobs=ref.T), "ref_logprobs has shape"),
        (dict(entropy=ent[:, :5]), "entropy has shape"),
        (dict(logprobs=lp[0]), r"logprobs must be \[B, L\]"),
        (dict(agg="seq-sum"), "unknown agg"),
        (dict(kl_type="k4", ref_logprobs=ref), "unknown kl_type"),
        (dict(clip_low=1.0), "clip_low must be <"),
        (dict(clip_low=-0.1), "clip_low must be >="),
        (dict(clip_high=-0.1), "clip_high must be >="),
        (dict(clip_high=float("nan")), "clip_high must be a finite number"),
        (dict(dual_clip=1.0), "dual_clip must be >"),
        (dict(dual_clip=0.5), "dual_clip must be >"),
        (dict(kl_coef=0.1), "needs ref_logprobs"),
        (dict(entropy_coef=0.1), "needs entropy"),
        (dict(denominator=0), "denominator must be >"),
        (dict(denominator=torch.tensor(-1.0)), "denominator must be >"),
        (dict(denominator=torch.ones(2)), "denominator tensor must hold one"),
        (dict(backend="cuda"), "unknown backend"),
    ]
    base = dict(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)
    for over, msg in cases:
        kw = {**base, **over}
        args = [kw.pop(k) for k in ("logprobs", "old_logprobs", "advantages", "mask")]
        with pytest.raises((ValueError, TypeError), match=msg):
            policy_loss(*args, **kw)
    with pytest.raises(TypeError, match="old_logprobs must be a floating"):
        policy_loss(lp, old.long(), adv, mask)
