"""logprob_entropy with a vocab-parallel lm_head (TP=2 on real gloo ranks) vs one process.

Each rank holds half of the vocabulary rows; labels fall on both shards (and some are ignored);
the last shard ends in padded rows filled with garbage. The per-rank logprobs / entropies, the
(identical, all-reduced) hidden gradient and the concatenated weight-gradient shards must equal
the single-process float64 full-logits reference, for both backends. A second scenario pads so
much that rank 1's shard is padding only.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned ranks

import pytest  # noqa: E402

from eureka_megatron.kernels import logprob as lp_mod  # noqa: E402
from eureka_megatron.runtime.launcher import launch  # noqa: E402

T, H, V_LOCAL, TP = 37, 24, 150, 2
BACKENDS = ["torch", "triton"] if lp_mod.triton_usable(torch.device("cpu")) else ["torch"]


def _case(vocab_size, seed):
    g = torch.Generator().manual_seed(seed)
    V = V_LOCAL * TP
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64).float()
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4)
    weight[vocab_size:] = 5.0 * torch.randn(V - vocab_size, H, generator=g, dtype=torch.float64)
    weight = weight.float()
    labels = torch.randint(0, vocab_size, (T,), generator=g)
    labels[0] = 0
    labels[1] = vocab_size - 1
    if vocab_size > V_LOCAL:  # labels on both shards, including both ends of shard 1
        labels[2] = V_LOCAL - 1
        labels[3] = V_LOCAL
    labels[5::4] = -100
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_h = torch.randn(T, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, labels=labels, g_lp=g_lp, g_h=g_h,
                vocab_size=vocab_size, temperature=0.8)


CASES = {"pad_last_shard": _case(283, 0), "rank1_all_padding": _case(131, 1)}


def _rank_fn(cases, backends):
    import torch.distributed as dist

    from eureka_megatron.kernels.logprob import logprob_entropy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    group = dist.new_group(list(range(dist.get_world_size())))
    out = {}
    for name, c in cases.items():
        shard = c["weight"].chunk(TP)[rank]
        for backend in backends:
            h = c["hidden"].clone().requires_grad_()
            w = shard.clone().requires_grad_()
            lp, ent = logprob_entropy(h, w, c["labels"], temperature=c["temperature"],
                                      vocab_size=c["vocab_size"], tp_group=group,
                                      backend=backend)
            ((lp * c["g_lp"].float()).sum() + (ent * c["g_h"].float()).sum()).backward()
            out[(name, backend)] = (lp.detach(), ent.detach(), h.grad, w.grad)
    dist.destroy_process_group()
    return out


def _reference(c):
    h = c["hidden"].double().requires_grad_()
    w = c["weight"].double().requires_grad_()
    x = (h @ w[:c["vocab_size"]].t()) / c["temperature"]
    logp = torch.log_softmax(x, -1)
    ent = -(logp.exp() * logp).sum(-1)
    valid = c["labels"] >= 0
    lp = logp.gather(1, c["labels"].clamp(min=0)[:, None]).squeeze(1) * valid
    ent = ent * valid
    ((lp * c["g_lp"]).sum() + (ent * c["g_h"]).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _assert_rel(actual, expected, tol, name):
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, name
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    scale = e.abs().max().clamp_min(1e-300)
    err = (a - e).abs()
    assert (err <= tol * (e.abs() + scale)).all(), f"{name}: max abs err {err.max():.3e}"


@pytest.fixture(scope="module")
def tp_results():
    return launch(_rank_fn, TP, CASES, BACKENDS, timeout=600)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_single_process_reference(tp_results, case, backend):
    c = CASES[case]
    ref_lp, ref_ent, ref_dh, ref_dw = _reference(c)
    per_rank = [r[(case, backend)] for r in tp_results]
    for rank, (lp, ent, dh, dw) in enumerate(per_rank):
        tag = f"{case}/{backend}/rank{rank}"
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        _assert_rel(lp, ref_lp, 1e-5, f"{tag}/logprobs")
        _assert_rel(ent, ref_ent, 1e-5, f"{tag}/entropy")
        _assert_rel(dh, ref_dh, 1e-5, f"{tag}/d_hidden")
        ignored = c["labels"] < 0
        assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
        assert (dh[ignored] == 0).all()
    assert torch.equal(per_rank[0][2], per_rank[1][2]), "hidden gradient differs across ranks"
    dw = torch.cat([r[3] for r in per_rank])
    _assert_rel(dw, ref_dw, 1e-5, f"{case}/{backend}/d_weight")
    assert (dw[c["vocab_size"]:] == 0).all(), "padded rows got a gradient"
