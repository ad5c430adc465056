"""Log-probs from hidden states (the fused kernel) equal log_softmax of the full logits.

Our LLM at TP1 and TP2: `token_logprobs` over the final hidden states must give the log-probs and
entropies of the model's own full-vocab logits, and the same parameter gradients.
"""
import os

import pytest
import torch

from eureka_megatron.runtime.launcher import launch
from tests.helpers import tiny_config

os.environ.setdefault("TRITON_INTERPRET", "1")
VOCAB = 1000


def rank_fn(tp, backend):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from eureka_megatron.models.init import layout_invariant_init
    from eureka_megatron.models.llm import build_llm_chunks
    from eureka_megatron.models.logprobs import final_hidden_states, token_logprobs
    from eureka_megatron.runtime.distributed import init_distributed

    cfg = tiny_config(tp=tp)
    init_distributed(cfg.parallel)
    (model,) = build_llm_chunks(cfg.model, cfg.parallel)
    layout_invariant_init([model], seed=0, std=0.05)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
    labels = torch.roll(ids, -1, 1)
    labels[0, -3:] = -100

    logits = gather_from_tensor_model_parallel_region(model(ids, None, attention_mask=None))
    logp_all = torch.log_softmax(logits[..., :VOCAB].double(), -1)
    keep = labels >= 0
    ref_lp = logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * keep
    ref_ent = -(logp_all.exp() * logp_all).sum(-1) * keep
    (ref_lp.sum() + ref_ent.sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    with final_hidden_states(model):
        hidden = model(ids, None, attention_mask=None)
    lp, ent = token_logprobs(model, hidden, labels, vocab_size=VOCAB, backend=backend)
    (lp.sum() + ent.sum()).backward()
    worst = max(float((p.grad - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12))
                for n, p in model.named_parameters())
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max())  # noqa: E731
    return rel(lp, ref_lp), rel(ent, ref_ent), worst


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tp", [1, 2])
def test_token_logprobs_equal_full_logits(tp, backend):
    for lp_err, ent_err, grad_err in launch(rank_fn, tp, tp, backend):
        assert lp_err < 1e-5 and ent_err < 1e-5 and grad_err < 1e-5, (lp_err, ent_err, grad_err)
