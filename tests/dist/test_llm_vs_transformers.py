"""Our megatron Qwen2.5-family LLM computes what transformers' Qwen2ForCausalLM computes.

A tiny random HF model's weights go through the declarative Qwen2 mapping (QKV grouped per KV
head, gate/up fused, vocab padded) into the megatron model at TP1, TP2 and PP2, and fp32 logits
must match transformers; the mapping's inverse gives back the HF tensors bit for bit.
"""
import pytest
import torch

from eureka_megatron.models.qwen2.hf import qwen2_mapping
from eureka_megatron.runtime.launcher import launch
from tests.helpers import fill_and_forward, tiny_config

VOCAB = 1000


def hf_model(tie: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                      max_position_embeddings=512, tie_word_embeddings=tie,
                      rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                      attn_implementation="eager")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases/norms to constants; randomise them to test the mapping
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def llm_config_of(hf, cfg):
    """Our LLMConfig for the HF model (same dims as tests.helpers.tiny_config)."""
    c = hf.config
    cfg.model.intermediate_size = c.intermediate_size
    cfg.model.tie_word_embeddings = c.tie_word_embeddings
    return cfg


def megatron_logits(cfg, tensors, input_ids):
    """Rank function: build our LLM, fill it from `tensors`, return full-vocab logits (last stage)."""
    from eureka_megatron.models.llm import build_llm_chunks
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(cfg.parallel)
    chunks = build_llm_chunks(cfg.model, cfg.parallel)
    logits, used = fill_and_forward(chunks, tensors, {"input_ids": input_ids},
                                    lambda chunk, mb: chunk(mb["input_ids"], None, attention_mask=None))
    return (logits[..., :VOCAB] if logits is not None else None), used


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_logits_match_transformers(tie, tp, pp):
    hf = hf_model(tie)
    input_ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids).logits.float()
    cfg = llm_config_of(hf, tiny_config(tp=tp, pp=pp, tie=tie))
    hf_sd = hf.state_dict()
    tensors = qwen2_mapping(cfg.model).to_megatron(hf_sd.__getitem__)
    results = launch(megatron_logits, tp * pp, cfg, tensors, input_ids)
    logits = [r[0] for r in results if r[0] is not None][0]
    used = {k for r in results for k in r[1]}
    assert used == set(tensors)  # every HF tensor landed somewhere, nothing was left unset
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mapping_round_trip_is_bit_exact(tie):
    hf = hf_model(tie)
    cfg = llm_config_of(hf, tiny_config(tie=tie))
    mapping = qwen2_mapping(cfg.model)
    hf_sd = {k: v for k, v in hf.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert mapping.hf_names() == set(hf_sd)  # nothing unmapped, nothing invented
    back = mapping.to_hf(mapping.to_megatron(hf_sd.__getitem__))
    assert set(back) == set(hf_sd)
    for name, t in hf_sd.items():
        assert torch.equal(back[name], t), name
