"""Routing replay: the trainer routes each token to the experts the rollout engine chose.

A tiny random Qwen3-MoE whose routers are near-ties (every expert's router row is one shared row
plus 1e-6 noise) makes routing decided by rounding, as it is for some tokens of a real model: the
HF engine (batched prefill, KV-cached decode) and megatron (packed or padded rows, EP all-to-all,
TP + SP reductions) then pick different experts and the trainer's log-probs of the engine's own
samples differ by O(1). With the engine's routing replayed they agree at fp32 rounding (1e-5),
at EP2 (packed micro-batches) and TP2 + SP (padded).
"""
import dataclasses

import pytest
import torch

from eureka_megatron.config import ConfigError
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.routing_replay import check_config
from eureka_megatron.rollout.engine import SamplingParams
from eureka_megatron.rollout.hf_engine import HFEngine
from eureka_megatron.runtime.launcher import launch
from tests import rollout_fixtures as F
from tests.helpers import tiny_config


def near_tied_model():
    model = F.tiny_model("qwen3_moe")
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(1, p.shape[1], generator=gen) * 0.5
                        + 1e-6 * torch.randn(p.shape, generator=gen))
    return model


def trainer_logprobs(cfg, tensors, seqs, pack: bool):
    """Rank function: the response log-probs of `seqs` [(prompt, response, routing)] through our
    megatron model, in the trainer's micro-batches: {replayed: per-sequence log-probs}."""
    from eureka_megatron.models.forward import forward_token_logprobs
    from eureka_megatron.models.init import fill_global_tensors
    from eureka_megatron.models.inputs import text_call, text_prepare
    from eureka_megatron.models.llm import build_llm_chunks
    from eureka_megatron.models.routing_replay import replaying
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.batches import Sequence, micro_batches

    init_distributed(cfg.parallel)
    chunks = build_llm_chunks(cfg.model, cfg.parallel)
    fill_global_tensors(chunks, lambda key, layer, shape: tensors[(key, layer)])
    for c in chunks:
        c.eval()
    par = cfg.parallel

    def call(chunk, mb):  # what Actor.call does
        with replaying(chunk, mb):
            return text_call(cfg.model, chunk, mb)

    result = {}
    for replay in (False, True):
        rows = [Sequence(p, r, routed_experts=e if replay else None) for p, r, e in seqs]
        mbs = micro_batches(rows, 64, 0, lambda inputs: text_prepare(cfg.model, inputs),
                            width_multiple=par.tensor_parallel if par.sequence_parallel else 1,
                            pack=pack)
        out = [None] * len(rows)
        for mb, lp in zip(mbs, forward_token_logprobs(chunks, mbs, call, cfg.model.vocab_size)):
            for row, i in enumerate(mb["sequences"]):
                p, r = len(rows[i].prompt_ids), len(rows[i].response_ids)
                out[i] = lp[row, p - 1:p - 1 + r]
        result[replay] = out
    return result


@pytest.mark.parametrize("tp,ep,pack", [(1, 2, True), (2, 1, False)], ids=["ep2_packed", "tp2_sp_padded"])
def test_replayed_routing_makes_trainer_logprobs_equal_the_engines(tp, ep, pack):
    model = near_tied_model()
    engine = HFEngine(model, F.tiny_tokenizer(), eos_token_ids=[F.EOS])
    prompts = F.text_prompts((5, 11, 7))
    samples = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=16,
                                                         seed=1, return_routed_experts=True))
    seqs = [(list(prompts[s.prompt_index].input_ids), s.token_ids, s.routed_experts) for s in samples]
    cfg = tiny_config(tp=tp, nproc=tp * ep, sp=tp > 1)
    cfg.model = llm_config_from_hf(model.config.to_dict())
    cfg.parallel = dataclasses.replace(cfg.parallel, expert_parallel=ep)
    tensors = qwen2_mapping(cfg.model, experts="stacked").to_megatron(model.state_dict().__getitem__)
    got = launch(trainer_logprobs, tp * ep, cfg, tensors, seqs, pack)[0]
    diff = {replay: max(float((g - torch.tensor(s.logprobs)).abs().max())
                        for g, s in zip(lps, samples)) for replay, lps in got.items()}
    assert diff[True] < 1e-5, diff  # fp32 rounding
    assert diff[False] > 1e-2, diff  # the routing flips are real without the replay


def replayed_train_step(cfg, tensors, seqs, recompute: str):
    """Rank function: one optimizer step (next-token NLL of the responses) with the engine's
    routing replayed, under `recompute`; (loss, grad norm, this rank's gradients)."""
    from eureka_megatron.config import OptimConfig
    from eureka_megatron.models.init import fill_global_tensors
    from eureka_megatron.models.inputs import text_call, text_prepare
    from eureka_megatron.models.llm import build_llm_chunks, building
    from eureka_megatron.models.logprobs import final_hidden_states, token_logprobs, unwrap
    from eureka_megatron.models.packing import as_rows
    from eureka_megatron.models.routing_replay import replaying
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.batches import Sequence, micro_batches
    from eureka_megatron.trainer.train_step import train_step, wrap_for_training

    init_distributed(cfg.parallel)
    with building(recompute=recompute):
        chunks = build_llm_chunks(cfg.model, cfg.parallel)
    fill_global_tensors(chunks, lambda key, layer, shape: tensors[(key, layer)])
    model = wrap_for_training(chunks, OptimConfig(lr=1e-3), bf16=False, decay_steps=10)
    rows = [Sequence(p, r, routed_experts=e) for p, r, e in seqs]
    mbs = micro_batches(rows, 24, 0, lambda inputs: text_prepare(cfg.model, inputs), pack=True)

    def forward(chunk, mb):
        inner = unwrap(chunk)
        with final_hidden_states(inner), replaying(chunk, mb):
            hidden = text_call(cfg.model, chunk, mb)

        def loss(h):
            lp = as_rows(token_logprobs(inner, h, mb["labels"], cfg.model.vocab_size, 1.0,
                                        None)[0], mb)
            total = -(lp * mb["loss_mask"]).sum()
            count = mb["loss_mask"].sum().to(torch.int)
            return total, count, {"loss_sum": total.detach().double(), "count": count.double()}

        return hidden, loss

    metrics = train_step(model, mbs, forward)
    grads = {n: p.main_grad.clone() for c in model.chunks for n, p in c.named_parameters()}
    return metrics["loss"], metrics["grad_norm"], grads


def test_replay_holds_through_full_recompute():
    """Full recompute re-runs every layer inside the backward pass, after later micro-batches'
    forwards: the routers must replay each micro-batch's engine routing there too, or the
    recomputed experts differ from the forward's (near-tied routers make them differ) and the
    gradients with them. Several packed micro-batches, EP2."""
    model = near_tied_model()
    engine = HFEngine(model, F.tiny_tokenizer(), eos_token_ids=[F.EOS])
    prompts = F.text_prompts((5, 11, 7))
    samples = engine.generate(prompts, 2, SamplingParams(temperature=1.0, max_new_tokens=8,
                                                         seed=2, return_routed_experts=True))
    seqs = [(list(prompts[s.prompt_index].input_ids), s.token_ids, s.routed_experts) for s in samples]
    cfg = tiny_config(nproc=2)
    cfg.model = llm_config_from_hf(model.config.to_dict())
    cfg.parallel = dataclasses.replace(cfg.parallel, expert_parallel=2)
    tensors = qwen2_mapping(cfg.model, experts="stacked").to_megatron(model.state_dict().__getitem__)
    plain = launch(replayed_train_step, 2, cfg, tensors, seqs, "none")
    full = launch(replayed_train_step, 2, cfg, tensors, seqs, "full")
    for (loss0, norm0, g0), (loss1, norm1, g1) in zip(plain, full):
        assert abs(loss0 - loss1) <= 1e-6 * abs(loss0) and abs(norm0 - norm1) <= 1e-6 * norm0
        for name in g0:
            assert torch.allclose(g0[name], g1[name], rtol=1e-5, atol=1e-7), name


def test_routing_replay_config_is_checked():
    moe = llm_config_from_hf(F.tiny_model("qwen3_moe").config.to_dict())
    dense = llm_config_from_hf(F.tiny_model("qwen3").config.to_dict())
    check_config(True, moe)
    check_config(False, dense)
    with pytest.raises(ConfigError, match="routing_replay.*dense"):
        check_config(True, dense)
