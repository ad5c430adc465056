"""Advantage estimators, the online filter, reward shaping and the policy-loss variants against
independent float64 / pure-Python references."""
import math
import statistics

import pytest
import torch

from eureka_megatron.algo import (compute_advantages, kl_penalized_rewards, online_filter,
                                  overlong_penalty, policy_loss_sums)
from eureka_megatron.config import AlgoConfig
from eureka_megatron.kernels.policy_loss import policy_loss

GROUPS = [[1.0, 0.0, 0.0, 1.5], [0.5, 0.5, 0.5, 0.5], [1.5, 1.0, 0.0, 0.5], [0.0, 0.0, 0.0, 1.0]]


LENGTHS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]


def token_whitened(adv, lengths):
    """OpenRLHF's whitening written out: token-weighted mean, population token variance."""
    total = sum(lengths)
    mu = sum(a * n for a, n in zip(adv, lengths)) / total
    var = sum(n * (a - mu) ** 2 for a, n in zip(adv, lengths)) / total
    return [(a - mu) / math.sqrt(max(var, 1e-8)) for a in adv]


def reference(groups, estimator, lengths=LENGTHS):
    """Straight from the definitions, in pure Python."""
    out = []
    for g in groups:
        n, mu = len(g), sum(g) / len(g)
        if max(g) == min(g):
            out.append([0.0] * n)
        elif estimator == "grpo":
            out.append([(r - mu) / (statistics.stdev(g) + 1e-6) for r in g])
        elif estimator == "dr_grpo":
            out.append([r - mu for r in g])
        elif estimator == "rloo":
            out.append([r - (sum(g) - r) / (n - 1) for r in g])
        else:
            out.append([r - mu for r in g])
    flat = [a for g in out for a in g]
    if estimator == "reinforce++":
        flat = token_whitened(flat, lengths)
    return flat


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce++"])
def test_advantages_match_definitions(estimator):
    rewards = [r for g in GROUPS for r in g]
    adv = compute_advantages(rewards, 4, estimator, lengths=LENGTHS)
    assert adv.dtype == torch.float64
    assert adv.tolist() == pytest.approx(reference(GROUPS, estimator), rel=1e-12, abs=1e-12)
    if estimator != "reinforce++":
        assert adv[4:8].eq(0).all()  # the equal-reward group is exactly 0
    f32 = compute_advantages(torch.tensor(rewards, dtype=torch.float32), 4, estimator,
                             lengths=LENGTHS)
    assert f32.dtype == torch.float32


def test_reinforce_pp_whitens_over_tokens_as_openrlhf_and_verl():
    # rewards [1, 0 | .5, .5], lengths [1, 3 | 2, 2] (by hand: centred [.5, -.5, 0, 0], token
    # mean -1/8, token variance 7/64 (population) or 1/8 (verl's Bessel-corrected))
    adv = compute_advantages([1.0, 0.0, 0.5, 0.5], 2, "reinforce++", lengths=[1, 3, 2, 2])
    openrlhf = [0.625, -0.375, 0.125, 0.125]
    assert adv.tolist() == pytest.approx([a / math.sqrt(7 / 64) for a in openrlhf], rel=1e-12)
    assert adv.tolist() == pytest.approx([1.890, -1.134, 0.378, 0.378], abs=1e-3)
    verl = adv * math.sqrt(7 / 8)  # the same with sum(L) - 1 in the variance
    assert verl.tolist() == pytest.approx([1.768, -1.061, 0.354, 0.354], abs=1e-3)
    # sequence-level whitening (the old form) would ignore the lengths: not the same
    assert compute_advantages([1.0, 0.0, 0.5, 0.5], 2, "reinforce++",
                              lengths=[2, 2, 2, 2]).tolist() != pytest.approx(adv.tolist())
    with pytest.raises(ValueError, match="needs the response lengths"):
        compute_advantages([1.0, 0.0], 2, "reinforce++")
    with pytest.raises(ValueError, match="3 lengths for 4"):
        compute_advantages([1.0, 0.0, 0.5, 0.5], 2, "reinforce++", lengths=[1, 2, 3])


def test_whiten_option_applies_token_whitening_to_any_estimator():
    rewards = [r for g in GROUPS for r in g]
    plain = compute_advantages(rewards, 4, "rloo")
    whitened = compute_advantages(rewards, 4, "rloo", lengths=LENGTHS, whiten=True)
    assert whitened.tolist() == pytest.approx(token_whitened(plain.tolist(), LENGTHS), rel=1e-12)
    w = torch.tensor(LENGTHS, dtype=torch.float64)
    assert float((w * whitened).sum()) == pytest.approx(0.0, abs=1e-12)  # token mean 0
    assert float((w * whitened ** 2).sum() / w.sum()) == pytest.approx(1.0, rel=1e-12)


def test_grpo_equal_rewards_are_exactly_zero_even_when_mean_rounds():
    adv = compute_advantages([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], 3, "grpo")
    assert adv.eq(0).all()


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="whole groups"):
        compute_advantages([1.0, 0.0, 1.0], 2)
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages([1.0, 0.0], 1, "grpo")
    with pytest.raises(ValueError, match="reward 1 is nan"):
        compute_advantages([1.0, float("nan")], 2)
    with pytest.raises(ValueError, match="unknown estimator"):
        compute_advantages([1.0, 0.0], 2, "ppo")
    assert compute_advantages([1.0, 0.0], 1, "dr_grpo").eq(0).all()


def test_online_filter_drops_constant_partial_credit_groups():
    acc = [0.5] * 4 + [0.5, 0.5, 0.5, 1.0] + [0.25, 0.75, 0.25, 0.75]
    assert online_filter(acc, 4).tolist() == [False] * 4 + [True] * 8  # mean 0.5 but constant


def test_filter_rounds_sample_what_the_keep_rate_says():
    from eureka_megatron.trainer.collect import prompts_to_sample

    assert prompts_to_sample(16, 0, 0, 0) == 16  # a full batch first
    assert prompts_to_sample(16, 0, 16, 1) == 16  # nothing kept yet: no rate to go by
    assert prompts_to_sample(16, 8, 16, 1) == 16  # half kept: 8 missing / 0.5
    assert prompts_to_sample(16, 12, 16, 1) == 6  # 4 missing / 0.75 -> 5.33 -> 6
    assert prompts_to_sample(16, 15, 16, 1) == 2  # 1 missing / 0.9375 -> 1.07 -> 2
    assert prompts_to_sample(16, 2, 32, 2) == 16  # rate 1/16: capped at a full batch
    assert prompts_to_sample(16, 15, 15, 1) == 1  # everything kept: exactly the missing one


def test_online_filter_keeps_groups_inside_the_band():
    acc = [1, 1, 1, 1] + [0, 0, 0, 0] + [1, 0, 0, 0] + [1, 1, 1, 0]
    keep = online_filter(acc, 4, 0.1, 0.9)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False] * 8 + [True] * 8
    # boundaries are inclusive and exact: 1/10 and 9/10 stay for [0.1, 0.9]
    acc10 = [1] + [0] * 9 + [1] * 9 + [0]
    assert online_filter(acc10, 10).all()
    assert online_filter(acc, 4, 0.3, 0.7).tolist() == [False] * 16
    # the widest band still drops groups whose accuracies are all equal (zero advantage)
    assert online_filter(acc, 4, 0.0, 1.0).tolist() == [False] * 8 + [True] * 8
    with pytest.raises(ValueError, match="whole groups"):
        online_filter([1, 0, 1], 2)
    with pytest.raises(ValueError, match="low <= high"):
        online_filter([1, 0], 2, 0.9, 0.1)


def test_kl_penalized_rewards_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    rewards = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    for kl_type, f in (("k1", lambda d: d), ("k2", lambda d: d * d / 2),
                       ("k3", lambda d: math.exp(-d) + d - 1)):
        shaped, kl = kl_penalized_rewards(rewards, lp, ref, mask, 0.1, kl_type)
        want = [sum(f(float(lp[i, j] - ref[i, j])) for j in range(5) if mask[i, j])
                for i in range(3)]
        assert kl.tolist() == pytest.approx(want, rel=1e-6, abs=1e-7)
        assert shaped.tolist() == pytest.approx([r - 0.1 * k for r, k in zip(rewards.tolist(), want)],
                                                rel=1e-6)


def test_overlong_penalty_ramps_to_minus_factor():
    pen = overlong_penalty([10, 60, 70, 80, 100, 120], max_length=100, buffer=40, factor=0.5)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.125, -0.25, -0.5, -0.5])
    with pytest.raises(ValueError, match="overlong buffer"):
        overlong_penalty([1], 10, 0)


# ----------------------------------------------------------------------------- policy losses


def batch(B=6, L=9, seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    old = -1.0 - torch.rand(B, L, generator=g, dtype=torch.float64)
    lp = (old + spread * torch.randn(B, L, generator=g, dtype=torch.float64)).requires_grad_()
    ref = old + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    ent = torch.rand(B, L, generator=g, dtype=torch.float64).requires_grad_()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    return lp, old, ref, ent, adv, mask


def agg_reference(loss_tok, mask, agg, L_norm=None):
    m = mask.double()
    n_b = m.sum(1)
    if agg == "token-mean":
        return (m * loss_tok).sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return ((m * loss_tok).sum(1) / n_b).mean()
    return (m * loss_tok).sum() / (mask.shape[0] * L_norm)


def sums_loss(algo, lp, old, adv, mask, **kw):
    num, count, metrics = policy_loss_sums(algo, lp, old, adv, mask, backend="torch", **kw)
    return num / count, metrics


AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("agg", AGGS)
def test_ppo_is_the_kernel_with_global_denominators(agg):
    lp, old, ref, ent, adv, mask = batch()
    algo = AlgoConfig(loss="ppo", agg=agg, clip_high=0.28, dual_clip=3.0, kl_coef=0.05,
                      entropy_coef=0.01)
    loss, metrics = sums_loss(algo, lp, old, adv, mask, ref_logprobs=ref, entropy=ent,
                              sum_norm_length=12)
    want, _ = policy_loss(lp, old, adv, mask, ref_logprobs=ref, clip_low=0.2, clip_high=0.28,
                          dual_clip=3.0, kl_coef=0.05, entropy=ent, entropy_coef=0.01, agg=agg,
                          denominator=6 * 12 if agg.endswith("norm") else None, backend="torch")
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-12)
    assert metrics["clipfrac_low"] + metrics["clipfrac_high"] > 0  # the clip paths are exercised


@pytest.mark.parametrize("agg", AGGS)
def test_gspo_matches_the_sequence_level_definition(agg):
    lp, old, ref, ent, adv, mask = batch(spread=0.05)
    eps_lo, eps_hi = 0.01, 0.02
    algo = AlgoConfig(loss="gspo", agg=agg, clip_low=eps_lo, clip_high=eps_hi, dual_clip=None)
    loss, metrics = sums_loss(algo, lp, old, adv, mask, sum_norm_length=12)
    (g_ours,) = torch.autograd.grad(loss, lp)

    m = mask.double()
    s = torch.exp((m * (lp - old)).sum(1) / m.sum(1))           # GSPO's sequence ratio
    pg = torch.maximum(-adv * s, -adv * s.clamp(1 - eps_lo, 1 + eps_hi))
    want = agg_reference(pg[:, None].expand_as(lp), mask, agg, 12)
    if agg == "seq-mean-token-mean":  # exactly GSPO's objective: mean over sequences
        assert float(loss) == pytest.approx(float(want), rel=1e-12)
        (g_ref,) = torch.autograd.grad(want, lp)
        assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    clipped = ((adv > 0) & (s > 1 + eps_hi)) | ((adv < 0) & (s < 1 - eps_lo))
    assert clipped.any() and not clipped.all()
    assert (g_ours[clipped] == 0).all()
    assert float(metrics["seq_ratio_max"]) == pytest.approx(float(s.max()), rel=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_cpgd_matches_mm_eureka_formula(agg):
    lp, old, ref, ent, adv, mask = batch()
    eps = 0.2
    algo = AlgoConfig(loss="cpgd", agg=agg, clip_low=eps, clip_high=eps, cpgd_drift_coef=0.01,
                      cpgd_drift_clip=2.0)
    loss, metrics = sums_loss(algo, lp, old, adv, mask, sum_norm_length=12)
    (g_ours,) = torch.autograd.grad(loss, lp)

    A = adv[:, None].expand_as(lp)
    clipped_logp = torch.where(A > 0, torch.minimum(lp, old + math.log(1 + eps)),
                               torch.maximum(lp, old + math.log(1 - eps)))
    drift = (torch.exp(lp.detach() - old) - 1).clamp(max=2.0) * lp
    mm = agg_reference(-clipped_logp * A + 0.01 * drift, mask, agg, 12)
    (g_ref,) = torch.autograd.grad(mm, lp)
    assert torch.allclose(g_ours, g_ref, rtol=1e-10, atol=1e-14)
    # the same value up to MM-Eureka's constant offset: log-ratios instead of log-probs
    drift_r = (torch.exp(lp.detach() - old) - 1).clamp(max=2.0) * (lp - old)
    shifted = agg_reference(-(clipped_logp - old) * A + 0.01 * drift_r, mask, agg, 12)
    assert float(loss) == pytest.approx(float(shifted), rel=1e-12)
    assert metrics["clipfrac_low"] + metrics["clipfrac_high"] > 0


@pytest.mark.parametrize("variant", ["gspo", "cpgd"])
def test_kl_and_entropy_terms_are_the_kernels(variant):
    lp, old, ref, ent, adv, mask = batch()
    base = AlgoConfig(loss=variant, agg="token-mean")
    reg = AlgoConfig(loss=variant, agg="token-mean", kl_coef=0.1, kl_type="k2", entropy_coef=0.02)
    l0, _ = sums_loss(base, lp, old, adv, mask)
    l1, metrics = sums_loss(reg, lp, old, adv, mask, ref_logprobs=ref, entropy=ent)
    m = mask.double()
    kl = ((lp - ref) ** 2 / 2 * m).sum() / m.sum()
    e = (ent * m).sum() / m.sum()
    assert float(l1 - l0) == pytest.approx(float(0.1 * kl - 0.02 * e), rel=1e-10)
    assert float(metrics["kl"]) == pytest.approx(float(kl), rel=1e-10)
    (g_ent,) = torch.autograd.grad(l1, ent)
    assert torch.allclose(g_ent, -0.02 * m / m.sum())


def test_kl_in_reward_is_not_a_loss_term():
    lp, old, ref, ent, adv, mask = batch()
    in_loss = AlgoConfig(kl_coef=0.1)
    in_reward = AlgoConfig(kl_coef=0.1, kl_in="reward")
    l_loss, _ = sums_loss(in_loss, lp, old, adv, mask, ref_logprobs=ref)
    l_rew, metrics = sums_loss(in_reward, lp, old, adv, mask, ref_logprobs=ref)
    l_none, _ = sums_loss(AlgoConfig(), lp, old, adv, mask)
    assert float(l_rew) == float(l_none) != float(l_loss)
    assert "kl" in metrics
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        sums_loss(in_loss, lp, old, adv, mask)


@pytest.mark.parametrize("variant", ["ppo", "gspo", "cpgd"])
def test_first_step_ratio_is_exactly_one(variant):
    lp, old, ref, ent, adv, mask = batch()
    lp0 = old.clone().requires_grad_()
    _, metrics = sums_loss(AlgoConfig(loss=variant), lp0, old, adv, mask, ref_logprobs=old)
    for k in ("ratio_mean", "ratio_min", "ratio_max"):
        assert float(metrics[k]) == 1.0, k
    assert float(metrics["approx_kl"]) == 0.0 and float(metrics["kl"]) == 0.0
    assert float(metrics["clipfrac_low"]) == float(metrics["clipfrac_high"]) == 0.0


@pytest.mark.parametrize("variant", ["ppo", "gspo", "cpgd"])
@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_sums_add_up_to_the_full_batch(variant, agg):
    lp, old, ref, ent, adv, mask = batch(B=8)
    algo = AlgoConfig(loss=variant, agg=agg, kl_coef=0.05, entropy_coef=0.01)
    kw = dict(sum_norm_length=12)
    full, _ = sums_loss(algo, lp, old, adv, mask, ref_logprobs=ref, entropy=ent, **kw)
    (g_full,) = torch.autograd.grad(full, lp)
    nums, counts = [], []
    for sl in (slice(0, 2), slice(2, 3), slice(3, 7), slice(7, 8)):
        num, count, _ = policy_loss_sums(algo, lp[sl], old[sl], adv[sl], mask[sl],
                                         ref_logprobs=ref[sl], entropy=ent[sl], backend="torch", **kw)
        nums.append(num)
        counts.append(int(count))
    split = sum(nums) / sum(counts)
    (g_split,) = torch.autograd.grad(split, lp)
    assert float(split) == pytest.approx(float(full), rel=1e-12)
    assert torch.allclose(g_split, g_full, rtol=1e-10, atol=1e-15)


def test_sum_norm_needs_a_constant_length():
    lp, old, ref, ent, adv, mask = batch()
    with pytest.raises(ValueError, match="sum_norm_length"):
        policy_loss_sums(AlgoConfig(agg="seq-mean-token-sum-norm"), lp, old, adv, mask)
    with pytest.raises(ValueError, match="per-sequence advantages"):
        policy_loss_sums(AlgoConfig(loss="gspo"), lp, old, adv[:, None].expand_as(lp), mask)


def test_grpo_eps_is_configurable():
    rewards = [1.0, 0.0, 0.0, 0.0]
    std = statistics.stdev(rewards)
    got = compute_advantages(rewards, 4, "grpo", grpo_eps=1e-9)
    assert got.tolist() == pytest.approx([(r - 0.25) / (std + 1e-9) for r in rewards], rel=1e-14)
    assert got[0] != compute_advantages(rewards, 4, "grpo")[0]  # default 1e-6 differs


def test_clip_filter_like_weights_scale_the_groups_that_carry_signal():
    # 4 groups, 1 constant: the other three get min(4 / 3, 3) (CPGD's clip-filter-like weight)
    rewards = [r for g in GROUPS for r in g]
    plain = compute_advantages(rewards, 4, "grpo")
    weighted = compute_advantages(rewards, 4, "grpo", clip_filter_like_cap=3.0)
    assert weighted.tolist() == pytest.approx((plain * 4 / 3).tolist(), rel=1e-14)
    # 4 groups, 3 constant: 4 / 1 = 4, capped at 3
    few = [1.0, 0.0, 1.0, 0.0] + [1.0] * 4 + [0.0] * 4 + [0.5] * 4
    assert compute_advantages(few, 4, "dr_grpo", clip_filter_like_cap=3.0)[:4].tolist() == \
        pytest.approx([1.5, -1.5, 1.5, -1.5])
    assert compute_advantages([1.0] * 8, 4, "grpo", clip_filter_like_cap=3.0).eq(0).all()
