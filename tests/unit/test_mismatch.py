"""Rollout importance sampling (algo/mismatch.py) against hand computation.

On a CPU in fp32 the engine's and the trainer's log-probs agree to rounding, so the weights would
all be 1; here the rollout log-probs are perturbed by known amounts instead."""
import math

import pytest
import torch

from eureka_megatron.algo.mismatch import corrected, mismatch_sums
from eureka_megatron.algo.policy_loss import policy_loss_sums
from eureka_megatron.config import AlgoConfig, ConfigError

# two sequences: 3 response tokens, then 2 (the third position is padding)
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -1.1, 0.0]], dtype=torch.float64)
# log p_old - log p_rollout per token: [0.1, 1.0, -0.4 | -1.2, 0.2]
DELTA = torch.tensor([[0.1, 1.0, -0.4], [-1.2, 0.2, 0.0]], dtype=torch.float64)
ROLLOUT = OLD - DELTA
ADV = torch.tensor([0.5, -2.0], dtype=torch.float64)
CAP = 2.0


def test_token_weights_are_truncated_ratios():
    adv, mask = corrected("token", CAP, ADV, MASK, OLD, ROLLOUT)
    w = [[math.exp(0.1), 2.0, math.exp(-0.4)], [math.exp(-1.2), math.exp(0.2), 1.0]]
    want = [0.5 * x for x in w[0]] + [-2.0 * x for x in w[1][:2]] + [-2.0]
    assert adv.flatten().tolist() == pytest.approx(want, rel=1e-12)
    assert torch.equal(mask, MASK)


def test_sequence_weights_are_truncated_geometric_means():
    adv, mask = corrected("sequence", CAP, ADV, MASK, OLD, ROLLOUT)
    # means of the log-ratios: (0.1 + 1.0 - 0.4) / 3 = 0.2333, (-1.2 + 0.2) / 2 = -0.5
    assert adv.tolist() == pytest.approx([0.5 * math.exp(0.7 / 3), -2.0 * math.exp(-0.5)],
                                         rel=1e-12)
    big = corrected("sequence", CAP, ADV, MASK, OLD, OLD - 3 * MASK)[0]
    assert big.tolist() == pytest.approx([0.5 * CAP, -2.0 * CAP])  # capped at C


def test_mask_drops_sequences_outside_the_band():
    adv, mask = corrected("mask", 1.5, ADV, MASK, OLD, ROLLOUT)  # log 1.5 = 0.405
    assert torch.equal(adv, ADV)
    # sequence 0: mean 0.233 inside; sequence 1: mean -0.5 outside [1/1.5, 1.5]
    assert mask.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_off_changes_nothing_and_bad_modes_are_refused():
    adv, mask = corrected("off", CAP, ADV, MASK, OLD, ROLLOUT)
    assert adv is ADV and mask is MASK
    with pytest.raises(ValueError, match="not one of"):
        corrected("tis", CAP, ADV, MASK, OLD, ROLLOUT)
    with pytest.raises(ValueError, match="> 1"):
        corrected("token", 1.0, ADV, MASK, OLD, ROLLOUT)
    with pytest.raises(ConfigError, match="rollout_is=token.*gspo"):
        AlgoConfig(loss="gspo", rollout_is="token").validate()
    with pytest.raises(ConfigError, match="rollout_is_cap"):
        AlgoConfig(rollout_is_cap=0.5).validate()


def test_mismatch_metrics_by_hand():
    sums = mismatch_sums(OLD, ROLLOUT, MASK, CAP)
    d = [0.1, 1.0, -0.4, -1.2, 0.2]
    assert float(sums["rollout_logprob_abs_diff_tsum"]) == pytest.approx(sum(map(abs, d)))
    assert float(sums["rollout_logprob_abs_diff_max"]) == pytest.approx(1.2)
    assert float(sums["rollout_k3_kl_tsum"]) == pytest.approx(
        sum(math.exp(x) - 1 - x for x in d), rel=1e-12)
    assert float(sums["rollout_beyond_cap_tsum"]) == 2.0  # |1.0| and |-1.2| > log 2


def test_token_weighted_loss_is_the_weighted_surrogate():
    """With ratio 1 (one pass), ppo's token loss is -A * w_t: check the loss and its gradient."""
    algo = AlgoConfig(rollout_is="token", dual_clip=None)
    lp = OLD.clone().float().requires_grad_()
    adv, mask = corrected("token", CAP, ADV.float(), MASK, OLD.float(), ROLLOUT.float())
    num, count, _ = policy_loss_sums(algo, lp, OLD.float(), adv, mask, backend="torch")
    w = torch.exp(DELTA.clamp(max=math.log(CAP))) * MASK
    want = -(ADV[:, None] * w).sum()
    assert float(num) == pytest.approx(float(want), rel=1e-6) and int(count) == 5
    (grad,) = torch.autograd.grad(num, lp)
    assert grad.double().flatten().tolist() == pytest.approx(
        (-(ADV[:, None] * w)).flatten().tolist(), rel=1e-6)
