"""The RL step's gradient does not depend on how the batch is split (real gloo ranks).

For every policy-loss variant and aggregation mode, one step's gradient on our megatron LLM must
be the same for 1 vs 4 micro-batches at DP1 and for DP2 (1 and 2 micro-batches per rank), and equal
an independent reference: full-vocab logits -> log_softmax -> the loss of the whole batch at once.
"""
import math
import os

import pytest
import torch

from eureka_megatron.config import AlgoConfig, OptimConfig
from eureka_megatron.runtime.launcher import launch
from tests.helpers import tiny_config

os.environ.setdefault("TRITON_INTERPRET", "1")
VOCAB, B, S, L_NORM = 1000, 8, 16, 24
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
ALGOS = {
    "ppo": dict(loss="ppo", clip_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01),
    "gspo": dict(loss="gspo", clip_low=0.03, clip_high=0.03, dual_clip=None, kl_coef=0.05),
    "cpgd": dict(loss="cpgd", kl_coef=0.05, kl_type="k2", entropy_coef=0.01),
}
CASES = [(name, agg) for name in ALGOS for agg in AGGS]


def _batch(model):
    """A fixed global batch: prompts and responses of different lengths; old/ref log-probs near
    the model's own (so some ratios clip, some do not)."""
    from eureka_megatron.models.logprobs import token_logprobs, final_hidden_states

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    mask = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        start = int(torch.randint(2, 6, (1,), generator=g))
        n = int(torch.randint(1, S - start, (1,), generator=g))
        mask[b, start - 1:start - 1 + n] = True
    with torch.no_grad():
        with final_hidden_states(model):
            hidden = model(ids, None, attention_mask=None)
        lp, _ = token_logprobs(model, hidden, labels, VOCAB, backend="torch")
    old = lp + 0.3 * torch.randn(B, S, generator=g)
    ref = lp + 0.2 * torch.randn(B, S, generator=g)
    adv = torch.randn(B, generator=g)
    return dict(input_ids=ids, labels=labels, loss_mask=mask, old_logprobs=old,
                ref_logprobs=ref, advantages=adv)


def reference_loss(algo, lp, old, ref, ent, adv, mask):
    """The whole batch's loss straight from the definitions (float64; an independent reference)."""
    m, A = mask.double(), adv[:, None]
    n_b = m.sum(1)
    if algo.loss == "ppo":
        r = torch.exp(lp - old)
        pg = torch.maximum(-A * r, -A * r.clamp(1 - algo.clip_low, 1 + algo.clip_high))
        pg = torch.where(A < 0, torch.minimum(pg, -A * algo.dual_clip), pg)
    elif algo.loss == "gspo":
        s = torch.exp((m * (lp - old)).sum(1, keepdim=True) / n_b[:, None])
        pg = torch.maximum(-A * s, -A * s.clamp(1 - algo.clip_low, 1 + algo.clip_high))
        pg = pg.expand_as(lp)
    else:  # CPGD with log-ratios (MM-Eureka uses log-probs: the same gradient)
        log_r = lp - old
        clipped = torch.where(A > 0, log_r.clamp(max=math.log(1 + algo.clip_high)),
                              log_r.clamp(min=math.log(1 - algo.clip_low)))
        drift = (torch.exp(log_r.detach()) - 1).clamp(max=algo.cpgd_drift_clip) * log_r
        pg = -A * clipped + algo.cpgd_drift_coef * drift
    d = lp - ref
    kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) + d - 1}[algo.kl_type]
    tok = pg + algo.kl_coef * kl - algo.entropy_coef * ent
    if algo.agg == "token-mean":
        return (m * tok).sum() / m.sum()
    if algo.agg == "seq-mean-token-mean":
        return ((m * tok).sum(1) / n_b).mean()
    return (m * tok).sum() / (len(lp) * L_NORM)


def _reference_grad(model, batch, algo):
    """Whole batch, full logits, plain autograd."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model.zero_grad(set_to_none=True)
    logits = gather_from_tensor_model_parallel_region(model(batch["input_ids"], None,
                                                            attention_mask=None))
    logp = torch.log_softmax(logits[..., :VOCAB].double(), -1)
    labels = batch["labels"].clamp(min=0)[..., None]
    lp = logp.gather(-1, labels)[..., 0]
    ent = -(logp.exp() * logp).sum(-1)
    loss = reference_loss(algo, lp, batch["old_logprobs"].double(), batch["ref_logprobs"].double(),
                          ent, batch["advantages"].double(), batch["loss_mask"])
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]).double(), float(loss)


def rank_fn(dp, splits, with_reference):
    from megatron.core import parallel_state as ps

    from eureka_megatron.models.init import layout_invariant_init
    from eureka_megatron.models.llm import build_llm_chunks
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.policy_forward import policy_forward
    from eureka_megatron.trainer.train_step import (finish_metrics, run_forward_backward,
                                                    wrap_for_training)

    cfg = tiny_config(nproc=dp)
    cfg.optim = OptimConfig(distributed_optimizer=False)  # full gradients on every rank
    init_distributed(cfg.parallel)
    rank = ps.get_data_parallel_rank()
    results = {}
    for name, agg in CASES:
        algo = AlgoConfig(agg=agg, **ALGOS[name]).validate()
        (model,) = build_llm_chunks(cfg.model, cfg.parallel)
        layout_invariant_init([model], seed=0, std=0.05)
        batch = _batch(model)
        if with_reference:
            results[(name, agg, "reference")] = _reference_grad(model, batch, algo)
            model.zero_grad(set_to_none=True)
        trainable = wrap_for_training([model], cfg.optim, bf16=cfg.parallel.bf16,
                                      decay_steps=cfg.train.steps)
        forward = policy_forward(algo, VOCAB, sum_norm_length=L_NORM, backend="torch")
        mine = {k: v[rank * B // dp:(rank + 1) * B // dp] for k, v in batch.items()}
        for n_micro in splits:
            size = B // dp // n_micro
            mbs = [{k: v[i * size:(i + 1) * size] for k, v in mine.items()} for i in range(n_micro)]
            for c in trainable.chunks:
                c.zero_grad_buffer()
            metrics = finish_metrics(run_forward_backward(trainable, mbs, forward))
            grad = torch.cat([p.main_grad.flatten() for p in model.parameters()]).double()
            results[(name, agg, n_micro)] = (grad, metrics["loss"], metrics)
    return results


@pytest.fixture(scope="module")
def runs():
    dp1 = launch(rank_fn, 1, 1, [1, 4], True)[0]
    dp2 = launch(rank_fn, 2, 2, [1, 2], False)
    return dp1, dp2


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name,agg", CASES)
def test_gradient_independent_of_micro_batches_and_dp(runs, name, agg):
    dp1, dp2 = runs
    ref_grad, ref_loss = dp1[(name, agg, "reference")]
    base_grad, base_loss, base_metrics = dp1[(name, agg, 1)]
    assert rel(base_grad, ref_grad) < 1e-5
    assert base_loss == pytest.approx(ref_loss, rel=1e-5)
    assert base_metrics["clipfrac_low"] + base_metrics["clipfrac_high"] > 0
    others = {"dp1 x 4 micro": dp1[(name, agg, 4)]}
    for r, res in enumerate(dp2):
        others[f"dp2 rank {r} x 1 micro"] = res[(name, agg, 1)]
        others[f"dp2 rank {r} x 2 micro"] = res[(name, agg, 2)]
    for label, (grad, loss, metrics) in others.items():
        assert rel(grad, base_grad) < 1e-6, label
        assert loss == pytest.approx(base_loss, rel=1e-6), label
        for key in ("ratio_max", "ratio_min", "clipfrac_low", "clipfrac_high", "kl", "tokens"):
            if key in base_metrics:
                assert metrics[key] == pytest.approx(base_metrics[key], rel=1e-6, abs=1e-9), \
                    (label, key)
