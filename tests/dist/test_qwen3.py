"""Our megatron LLM in its Qwen3 form computes what transformers' Qwen3ForCausalLM computes.

Qwen3 differs from Qwen2 in the attention: no qkv bias, per-head RMSNorm of q and k before rope,
and a head_dim that is not hidden / heads (here 24 with hidden 64 and 4 heads). A tiny random HF
model goes through the family's mapping; fp32 logits must match at TP1, TP2 and PP2 with and
without sequence parallelism, and the mapping's inverse gives back every HF tensor bit for bit.
"""
import dataclasses

import pytest
import torch

from eureka_megatron.models.qwen2.hf import llm_config_from_hf, qwen2_mapping
from eureka_megatron.models.registry import family_for
from eureka_megatron.runtime.launcher import launch
from tests.dist.test_llm_vs_transformers import megatron_logits
from tests.helpers import tiny_config

VOCAB = 1000


def hf_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24, rms_norm_eps=1e-6,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                      attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones; randomise them to test the mapping
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def our_config(hf, tp=1, pp=1, sp=False):
    cfg = tiny_config(tp=tp, pp=pp, sp=sp)
    cfg.model = llm_config_from_hf(hf.config.to_dict())
    return cfg


def test_config_from_hf_reads_qwen3():
    model = llm_config_from_hf(hf_model().config.to_dict())
    assert (model.qk_norm, model.qkv_bias, model.kv_channels) == (True, False, 24)
    assert family_for({"model_type": "qwen3"}).hf_class == "Qwen3ForCausalLM"


@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, False), (1, 2, False), (2, 1, True)],
                         ids=["tp1", "tp2", "pp2", "tp2_sp"])
def test_logits_match_transformers(tp, pp, sp):
    hf = hf_model()
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids).logits.float()
    cfg = our_config(hf, tp, pp, sp)
    cfg.model = dataclasses.replace(cfg.model, make_vocab_size_divisible_by=128)
    tensors = qwen2_mapping(cfg.model).to_megatron(hf.state_dict().__getitem__)
    results = launch(megatron_logits, tp * pp, cfg, tensors, input_ids)
    logits = next(r[0] for r in results if r[0] is not None)
    assert {k for r in results for k in r[1]} == set(tensors)
    assert any("q_layernorm" in k for k, _ in tensors)
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, float(rel)


def test_mapping_round_trip_is_bit_exact():
    hf = hf_model()
    sd = hf.state_dict()
    mapping = qwen2_mapping(llm_config_from_hf(hf.config.to_dict()))
    assert mapping.hf_names() == set(sd)
    back = mapping.to_hf(mapping.to_megatron(sd.__getitem__))
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
