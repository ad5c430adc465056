"""Mixture-of-Experts (Qwen3-MoE) in our megatron LLM, with expert parallelism.

A tiny random Qwen3MoeForCausalLM (4 layers, 8 experts, top-2, expert width 32, head_dim 24 with
hidden 64 and 4 heads, norms randomised) goes through the qwen3_moe family's mapping; fp32 logits
must match transformers at TP1, TP2 (+SP, which megatron's MoE layer needs under TP), EP2 and
TP2 x EP2 (PP2 with MoE layers: test_qwen3_vl_moe.py; converted files at TP2 x EP2:
tests/e2e/test_convert.py), with top-k weights renormalised or not; the mapping's inverse gives
back every HF tensor bit for bit, from transformers' stacked experts and from the per-expert
tensors save_pretrained writes. Bad expert layouts fail at config load, naming the key. The same
train steps at EP1 and EP2 (with and without the aux loss); a checkpoint saved at EP2 resumes at
EP1 and back.
"""
import dataclasses
from functools import lru_cache

import pytest
import torch

from eureka_megatron.config import ConfigError, ParallelConfig
from eureka_megatron.models.llm_config import validate_layout
from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.registry import family_for
from eureka_megatron.runtime.launcher import launch
from tests.dist.test_llm_vs_transformers import megatron_logits
from tests.helpers import rel_diff, tiny_config

VOCAB = 1000


@lru_cache(maxsize=2)
def hf_model(norm_topk: bool = True):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         norm_topk_prob=norm_topk, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones and the router to zeros: randomise them
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def our_config(hf, tp=1, pp=1, ep=1, sp=False):
    cfg = tiny_config(tp=tp, pp=pp, sp=sp, nproc=tp * pp * ep)
    cfg.model = llm_config_from_hf(hf.config.to_dict())
    cfg.parallel = dataclasses.replace(cfg.parallel, expert_parallel=ep)
    return cfg.validate()


def test_config_from_hf_reads_qwen3_moe():
    hf = hf_model()
    model = llm_config_from_hf(hf.config.to_dict())
    assert (model.num_experts, model.moe_intermediate_size, model.num_experts_per_tok,
            model.norm_topk_prob, model.qk_norm, model.moe_aux_loss_coeff) == (8, 32, 2, True, True, 0.0)
    assert model.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert model.num_active_parameters() == model.num_parameters() - 4 * 6 * 3 * 64 * 32
    # a hub config.json names the experts num_experts (transformers' to_dict: num_local_experts)
    hub = {**hf.config.to_dict(), "num_experts": 128, "norm_topk_prob": True}
    hub.pop("num_local_experts")
    assert llm_config_from_hf(hub).num_experts == 128
    # Qwen3-VL-MoE's router always renormalises
    assert llm_config_from_hf({**hub, "model_type": "qwen3_vl_moe_text",
                               "norm_topk_prob": False}).norm_topk_prob
    assert family_for({"model_type": "qwen3_moe"}).hf_class == "Qwen3MoeForCausalLM"


@pytest.mark.parametrize("key,value", [("decoder_sparse_step", 2), ("mlp_only_layers", [0]),
                                       ("shared_expert_intermediate_size", 64)])
def test_unsupported_moe_layouts_are_refused(key, value):
    with pytest.raises(ConfigError, match=key):
        llm_config_from_hf({**hf_model().config.to_dict(), key: value})


# PP2 (and TP2 x PP2) with MoE layers: tests/dist/test_qwen3_vl_moe.py
@pytest.mark.parametrize("tp,pp,ep,norm", [(1, 1, 1, True), (2, 1, 1, False), (1, 1, 2, False),
                                           (2, 1, 2, True)],
                         ids=["tp1", "tp2", "ep2", "tp2_ep2"])
def test_logits_match_transformers(tp, pp, ep, norm):
    hf = hf_model(norm)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids).logits.float()
    cfg = our_config(hf, tp, pp, ep, sp=tp > 1)
    assert cfg.model.norm_topk_prob is norm
    tensors = qwen2_mapping(cfg.model, experts="stacked").to_megatron(hf.state_dict().__getitem__)
    results = launch(megatron_logits, tp * pp * ep, cfg, tensors, input_ids)
    logits = next(r[0] for r in results if r[0] is not None)
    assert {k for r in results for k in r[1]} == set(tensors)  # every expert landed somewhere
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, float(rel)


def test_mapping_round_trip_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    hf = hf_model()
    fam = family_for(hf.config.to_dict())
    cfg = fam.config_from_hf(hf.config.to_dict(), None)
    sd = hf.state_dict()
    hf.save_pretrained(tmp_path)
    disk = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in disk
    assert tuple(sd["model.layers.0.mlp.experts.gate_up_proj"].shape) == (8, 64, 64)
    megatron = None
    for layout, tensors in (("memory", sd), ("disk", disk)):
        assert fam.detect_layout(set(tensors)) == layout
        mapping = fam.mapping(cfg, layout)
        assert mapping.hf_names() == set(tensors), layout
        got = mapping.to_megatron(tensors.__getitem__)
        if megatron is None:
            megatron = got
        assert set(got) == set(megatron) and all(torch.equal(got[k], megatron[k]) for k in got)
        back = mapping.to_hf(megatron)
        assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
        source = mapping.source(tensors.__getitem__)
        assert all(torch.equal(source(k, off, tuple(t.shape)), t) for (k, off), t in megatron.items())
    # Qwen3-VL-MoE's on-disk stack: each expert transposed
    stacked_t = {k: (v.transpose(1, 2) if k.endswith(("gate_up_proj", "down_proj")) else v)
                 for k, v in sd.items()}
    mapping = qwen2_mapping(cfg, experts="stacked_t")
    assert all(torch.equal(t, megatron[k]) for k, t in mapping.iter_megatron(stacked_t.__getitem__))
    assert all(torch.equal(t, stacked_t[n]) for n, t in mapping.iter_hf(megatron.__getitem__))


@pytest.mark.parametrize("change,key", [
    (dict(num_experts=6, expert_parallel=4, nproc=4), "parallel.expert_parallel"),
    (dict(num_experts=0, expert_parallel=2, nproc=2), "parallel.expert_parallel"),
    (dict(expert_parallel=2, tensor_parallel=2, nproc=2, sequence_parallel=True), "parallel.nproc"),
    (dict(expert_tensor_parallel=4, nproc=2), "parallel.nproc"),
    (dict(tensor_parallel=2, nproc=2), "parallel.sequence_parallel"),
    (dict(num_experts_per_tok=9), "model.num_experts_per_tok"),
], ids=["experts_not_divisible", "dense_model", "nproc_tp_ep", "nproc_etp", "tp_without_sp", "topk"])
def test_bad_expert_layouts_fail_before_ranks_start(change, key):
    model = llm_config_from_hf(hf_model().config.to_dict())
    model_fields = {k: change.pop(k) for k in ("num_experts", "num_experts_per_tok") if k in change}
    model = dataclasses.replace(model, **model_fields)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_layout(model, ParallelConfig(**change))


# --- training: the same batch gives the same loss and grad-norm at EP1 and EP2 ---------------


def moe_lm_config(ep=1, steps=3, aux=0.0, **kw):
    """tests.helpers.tiny_config's run with the Qwen3-MoE layer (8 experts, top-2) at DP2."""
    cfg = tiny_config(nproc=2, steps=steps, **kw)
    cfg.model = dataclasses.replace(cfg.model, qkv_bias=False, qk_norm=True, num_experts=8,
                                    moe_intermediate_size=32, num_experts_per_tok=2,
                                    moe_aux_loss_coeff=aux)
    cfg.parallel.expert_parallel = ep
    return cfg.validate()


@lru_cache(maxsize=4)
def lm_history(ep: int, aux: float = 0.0):
    """Every rank's metrics of 5 uninterrupted steps (the lr schedule does not depend on the
    step count: tiny_config's decay_steps)."""
    from eureka_megatron.trainer.lm_run import run_lm

    return launch(run_lm, 2, moe_lm_config(ep, 5, aux))


def assert_same_steps(history, ref, tol=1e-6):
    assert [m["step"] for m in history] == [m["step"] for m in ref]
    for m, r in zip(history, ref):
        for key in ("loss", "grad_norm"):
            assert rel_diff(m[key], r[key]) < tol, (m["step"], key, m[key], r[key])


@pytest.mark.parametrize("aux", [0.0, 0.01], ids=["no_aux", "aux_loss"])
def test_train_steps_same_at_ep1_and_ep2(aux):
    """DP2 at EP1 (every rank all experts, expert grads reduced over DP2) and EP2 (4 experts a
    rank, tokens exchanged by all-to-all, expert DP 1): the same losses and grad-norms. With
    model.moe_aux_loss_coeff the load-balancing loss changes the gradients, the same way."""
    ep1, ep2 = lm_history(1, aux), lm_history(2, aux)
    assert all(m["update_ok"] == 1.0 for m in ep1[0])
    for rank in ep1 + ep2:  # every rank reports the same
        assert_same_steps(rank, ep1[0])
    if aux:
        assert ep1[0][0]["grad_norm"] != lm_history(1)[0][0]["grad_norm"]
    print("EP1 vs EP2 rel diff (loss, grad-norm) per step, aux", aux,
          [(rel_diff(a["loss"], b["loss"]), rel_diff(a["grad_norm"], b["grad_norm"]))
           for a, b in zip(ep1[0], ep2[0])])


@pytest.fixture(scope="module")
def ep2_checkpoint(tmp_path_factory):
    """Steps 1-2 at EP2, saved (torch_dist, the distributed optimizer's state per expert shard)."""
    from eureka_megatron.trainer.lm_run import run_lm

    run = tmp_path_factory.mktemp("ep2")
    first = launch(run_lm, 2, moe_lm_config(2, 2, ckpt_dir=str(run)))[0]
    return run, first


def test_resume_across_expert_layouts(ep2_checkpoint, tmp_path):
    """The EP2 checkpoint (experts sharded over EP, two optimizers) resumed at EP1 (every rank
    all experts, one optimizer) for step 3, saved there and resumed at EP2 for steps 4-5 (step 5
    moves by the Adam moments loaded at EP2): the uninterrupted run's losses and grad-norms."""
    from eureka_megatron.trainer.lm_run import run_lm

    run, _ = ep2_checkpoint
    mid = launch(run_lm, 2, moe_lm_config(1, 3, ckpt_dir=str(tmp_path), load=str(run)))[0]
    end = launch(run_lm, 2, moe_lm_config(2, 5, load=str(tmp_path)))[0]
    assert_same_steps(mid + end, lm_history(1)[0][2:])
