"""InternVL3.5 (InternViT + pixel shuffle + mlp1 + a dense Qwen3 LLM) on megatron computes what
transformers' InternVLForConditionalGeneration with a `qwen3` text_config computes.

Two tiny random HF models, built by test_internvl.py's helpers: (a) an InternViT-300M-style tower
with a Qwen3 LLM (InternVL3.5-1B..30B's shape), loaded from the ORIGINAL `internvl_chat` layout
(language_model.model.layers.{i}.self_attn.q_norm ...), (b) an InternViT-6B-style tower (RMSNorm,
full-width qk-norm, 5 heads padded to 8) with a Qwen3 LLM (InternVL3.5-38B's shape), loaded from
the native on-disk layout. The Qwen3 LLM has head_dim 24 != hidden 64 / 4 heads and randomised
1-D parameters (q/k norms included). The two images are real pictures of different sizes tiled
by our preprocessing: 1 tile and 3 tiles + thumbnail. fp32 logits, image embeddings and the
tower's gradients match transformers at TP1, TP2, PP2 and TP2xPP2; the mapping round-trips bit
for bit in all three layouts; both config formats read back our config; the Qwen3-MoE and
GPT-OSS InternVL3.5 models fail with a clear error; InternVL3.5-38B's hub config reads as
InternViT-6B + Qwen3-32B with its own <IMG_CONTEXT> id.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from eureka_megatron.bench.convert import INTERNVL3_5_38B, write_config_dir
from eureka_megatron.config import ConfigError, ParallelConfig
from eureka_megatron.models.internvl import FAMILY
from eureka_megatron.models.internvl.config import InternVisionConfig, InternVLConfig
from eureka_megatron.models.internvl.hf import config_from_hf, detect_layout, internvl_mapping
from eureka_megatron.models.internvl.images import internvl_image_tokens, internvl_pixels
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.runtime.launcher import launch
from tests.dist.test_internvl import (IMAGE, TILE, VISION_KEYS, VOCAB, chat_config_json,
                                      hf_model, hf_state_dict, megatron_outputs, reference,
                                      reference_vision_grads, rel)

MODELS = {"qwen3": "chat", "qwen3_vit6b": "native_disk"}  # name -> the layout it is loaded from
SIZES = [(60, 50), (130, 50)]  # (width, height): 1 tile; 3 x 1 tiles + thumbnail


def our_config(name: str) -> InternVLConfig:
    text = LLMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                     max_position_embeddings=512, qkv_bias=False, qk_norm=True)
    if name == "qwen3_vit6b":
        vision = InternVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                                    num_attention_heads=5, norm_type="rms_norm", qkv_bias=False,
                                    qk_normalization=True, image_size=TILE, patch_size=14)
    else:
        vision = InternVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=8, norm_type="layer_norm", qkv_bias=True,
                                    image_size=TILE, patch_size=14)
    return InternVLConfig(text=text, vision=vision, llm_arch="qwen3", image_token_id=IMAGE)


def images_batch():
    """Two random pictures of different sizes through our tiling (tiles of TILE px): 1 and 4
    tiles, 4 and 16 image tokens, in two rows of equal length."""
    gen = np.random.default_rng(11)
    pictures = [Image.fromarray(gen.integers(0, 256, (h, w, 3), dtype=np.uint8))
                for w, h in SIZES]
    pixels, tiles = internvl_pixels(pictures, image_size=TILE, max_tiles=6)
    assert tiles == [1, 4]
    tokens = internvl_image_tokens(tiles, image_size=TILE, patch_size=14)
    g = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 990, (n,), generator=g)  # noqa: E731
    s0 = torch.cat([text(3), torch.full((tokens[0],), IMAGE), text(21)])
    s1 = torch.cat([text(5), torch.full((tokens[1],), IMAGE), text(7)])
    input_ids = torch.stack([s0, s1])
    return input_ids, pixels, torch.arange(input_ids.shape[1]).expand_as(input_ids)


def prepared(tmp_path):
    input_ids, pixels, position_ids = images_batch()
    mb = {"input_ids": input_ids, "pixel_values": pixels, "position_ids": position_ids}
    models, refs = {}, {}
    for name, layout in MODELS.items():
        cfg = our_config(name)
        cfg.freeze_vision = False
        hf = hf_model(cfg)
        grads = dict(reference_vision_grads(hf, cfg, pixels), pixels=pixels)
        refs[name] = (*reference(hf, input_ids, pixels), grads)
        sd = hf_state_dict(hf, cfg, layout, tmp_path / name)
        assert any(".self_attn.q_norm.weight" in k for k in sd), layout
        models[name] = (cfg, internvl_mapping(cfg, layout).to_megatron(sd.__getitem__), mb)
    return models, refs


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)],
                         ids=["tp1", "tp2", "pp2", "tp2_pp2"])
def test_logits_match_transformers(tp, pp, tmp_path):
    models, refs = prepared(tmp_path)
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp)
    results = launch(megatron_outputs, tp * pp, models, par, {n: r[2] for n, r in refs.items()})
    for name, (cfg, tensors, _) in models.items():
        ranks = [r[name] for r in results]
        logits = next(r[0] for r in ranks if r[0] is not None)
        images = next(r[1] for r in ranks if r[1] is not None)
        ref_logits, ref_images, _ = refs[name]
        assert all(not r[3] for r in ranks), (name, "not in sharded_state_dict", ranks)
        assert set().union(*(r[2] for r in ranks)) == set(tensors), name
        assert any("q_layernorm" in k and k.startswith("language_model.") for k, _ in tensors)
        for ours, ref in zip(images, ref_images):
            assert rel(ours, ref) < 1e-5, (name, rel(ours, ref))
        assert rel(logits, ref_logits) < 1e-5, (name, rel(logits, ref_logits))
        grad_errors = {k: e for r in ranks if r[4] for k, e in r[4].items()}
        assert set(grad_errors) == {k for k, _ in tensors if k.startswith(VISION_KEYS)}, name
        assert max(grad_errors.values()) < 1e-5, (name, grad_errors)


@pytest.mark.parametrize("name", list(MODELS))
def test_mapping_round_trip_all_layouts(name, tmp_path):
    cfg = our_config(name)
    hf = hf_model(cfg)
    for layout in ("native_memory", "native_disk", "chat"):
        sd = hf_state_dict(hf, cfg, layout, tmp_path / layout)
        assert detect_layout(set(sd)) == layout
        m = internvl_mapping(cfg, layout)
        assert m.hf_names() == set(sd), (layout, m.hf_names() ^ set(sd))
        back = m.to_hf(m.to_megatron(sd.__getitem__))
        assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items()), layout


@pytest.mark.parametrize("name", list(MODELS))
def test_config_from_hf_both_formats(name, tmp_path):
    cfg = our_config(name)
    native = json.loads(hf_model(cfg).config.to_json_string())
    assert native["text_config"]["model_type"] == "qwen3"
    assert config_from_hf(native) == cfg
    chat = chat_config_json(cfg)
    assert config_from_hf(chat, image_token_id=IMAGE) == cfg
    # the family reads the chat format's <IMG_CONTEXT> id from the tokenizer config beside it
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"151667": {"content": "<think>"},
                                  str(IMAGE): {"content": "<IMG_CONTEXT>"}}}))
    assert FAMILY.config_from_hf(chat, tmp_path) == cfg
    # and the image options the checkpoint's architecture fixes, from either format
    want = {"image_size": TILE, "patch_size": 14, "downsample_ratio": 0.5}
    assert FAMILY.image_options_from_hf(native, {}) == FAMILY.image_options_from_hf(chat, {}) == want


def test_moe_llms_fail_clearly():
    chat = chat_config_json(our_config("qwen3"))
    moe = dict(chat, llm_config=dict(chat["llm_config"], architectures=["Qwen3MoeForCausalLM"],
                                     model_type="qwen3_moe", num_experts=8))
    with pytest.raises(ConfigError, match="Qwen3-MoE.*30B-A3B.*not supported"):
        config_from_hf(moe, image_token_id=IMAGE)
    gpt_oss = dict(chat, llm_config=dict(chat["llm_config"], architectures=["GptOssForCausalLM"]))
    with pytest.raises(ConfigError, match="GPT-OSS.*not supported"):
        config_from_hf(gpt_oss, image_token_id=IMAGE)
    native = json.loads(hf_model(our_config("qwen3")).config.to_json_string())
    native["text_config"]["model_type"] = "qwen3_moe"
    with pytest.raises(ConfigError, match="text_config.model_type='qwen3_moe' is a Qwen3-MoE"):
        config_from_hf(native)
    biased = dict(chat, llm_config=dict(chat["llm_config"], attention_bias=True))
    with pytest.raises(ConfigError, match="attention_bias=true"):
        config_from_hf(biased, image_token_id=IMAGE)
    with pytest.raises(ConfigError, match="qk_norm"):
        InternVLConfig(text=LLMConfig(qkv_bias=False), llm_arch="qwen3")


def test_internvl3_5_38b_hub_config(tmp_path):
    """The bench's InternVL3.5-38B config.json + tokenizer config: InternViT-6B (25 heads padded
    to 32) + Qwen3-32B (head_dim 128 != 5120 / 64), <IMG_CONTEXT> 151671 (151667 is <think>)."""
    cfg = FAMILY.config_from_hf(INTERNVL3_5_38B, write_config_dir(tmp_path, INTERNVL3_5_38B))
    t, v = cfg.text, cfg.vision
    assert (cfg.llm_arch, cfg.image_token_id, cfg.shuffle_factor) == ("qwen3", 151671, 2)
    assert (t.qk_norm, t.qkv_bias, t.kv_channels, t.num_hidden_layers) == (True, False, 128, 64)
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads) == (5120, 64, 8)
    assert (v.num_hidden_layers, v.padded_heads, v.qk_normalization) == (45, 32, True)
    names = internvl_mapping(cfg, "chat").hf_names()
    assert "language_model.model.layers.63.self_attn.k_norm.weight" in names
    assert not any(".bias" in n for n in names if n.startswith("language_model."))
