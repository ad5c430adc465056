"""InternVL on megatron computes what transformers' InternVLForConditionalGeneration computes.

Three tiny random HF models are the reference: (a) an InternViT-300M-style tower (LayerNorm, qkv
bias) with a Qwen2 LLM, (b) the same tower with an InternLM2-style LLM (a Llama in transformers),
loaded from the ORIGINAL `internvl_chat` format that this test builds itself (q/k/v fused per KV
group into `wqkv`, OpenGVLab names), (c) an InternViT-6B-style tower (RMSNorm, no qkv bias,
full-width qk-norm) with 5 heads, zero-padded to 8. One batch holds two images of 1 and 2 tiles;
fp32 logits, image embeddings (also of tiles larger than the pretraining size: bicubic position
embeddings) and the trainable tower's gradients must match transformers at TP1, TP2, PP2 and
TP2xPP2; a torch_dist checkpoint saved at TP2 loads at PP2. The mapping round-trips bit-exactly in
all three layouts.
"""
import json
import os

import pytest
import torch

from eureka_megatron.config import ConfigError, ParallelConfig
from eureka_megatron.models.internvl.config import InternVisionConfig, InternVLConfig
from eureka_megatron.models.internvl.hf import (config_from_hf, detect_layout,
                                              image_token_id_from_tokenizer, internvl_mapping)
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.mapping import MappingError
from eureka_megatron.runtime.launcher import launch
from tests.helpers import fill_and_forward

IMAGE, VOCAB, TILE = 999, 1000, 56
TILES = [1, 2]  # tiles per image; 4 tokens per 56 px tile
VISION_KEYS = ("vision_model.", "vision_projection.")  # megatron keys of the tower + projector


def our_config(name: str) -> InternVLConfig:
    text = LLMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     qkv_bias=name != "internlm2")
    vit_300m = InternVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=8, norm_type="layer_norm", qkv_bias=True,
                                  image_size=TILE, patch_size=14)
    # 5 heads padded to 8: at TP2 both ranks hold real heads, one rank also dummy ones
    vit_6b = InternVisionConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=2,
                                num_attention_heads=5, norm_type="rms_norm", qkv_bias=False,
                                qk_normalization=True, image_size=TILE, patch_size=14)
    return InternVLConfig(text=text, vision=vit_6b if name == "vit6b" else vit_300m,
                          llm_arch="internlm2" if name == "internlm2" else "qwen2",
                          image_token_id=IMAGE)


MODELS = {"qwen2": "native_memory", "internlm2": "chat", "vit6b": "native_disk"}  # name -> layout


def hf_model(cfg: InternVLConfig):
    from transformers import InternVLConfig as HFConfig, InternVLForConditionalGeneration

    t, v = cfg.text, cfg.vision
    model_type = {"qwen2": "qwen2", "internlm2": "llama", "qwen3": "qwen3"}[cfg.llm_arch]
    text = dict(model_type=model_type, vocab_size=t.vocab_size, head_dim=t.kv_channels,
                hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta})
    vision = dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                  norm_type=v.norm_type, layer_norm_eps=v.layer_norm_eps, attention_bias=v.qkv_bias,
                  use_qk_norm=v.qk_normalization, image_size=v.image_size, patch_size=v.patch_size,
                  initializer_range=0.1)
    hf_cfg = HFConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                      downsample_ratio=cfg.downsample_ratio, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():  # randomise constant-initialised tensors to test their mapping
        for name, p in model.named_parameters():
            if "lambda_" in name:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1 or "cls_token" in name or "position_embeddings" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def chat_state_dict(hf_sd: dict, cfg: InternVLConfig) -> dict:
    """The original OpenGVLab `internvl_chat` checkpoint of the HF-native model, written
    independently of the mapping under test (transformers' converter, run backwards)."""
    vision_renames = [("embeddings.cls_token", "embeddings.class_embedding"),
                      ("embeddings.patch_embeddings.projection", "embeddings.patch_embedding"),
                      ("embeddings.position_embeddings", "embeddings.position_embedding"),
                      ("encoder.layer.", "encoder.layers."),
                      ("attention.projection_layer", "attn.proj"),
                      ("attention.q_norm", "attn.q_norm"), ("attention.k_norm", "attn.k_norm"),
                      ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                      ("lambda_1", "ls1"), ("lambda_2", "ls2")]
    internlm2_renames = [("embed_tokens", "tok_embeddings"), ("self_attn.o_proj", "attention.wo"),
                         ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                         ("mlp.down_proj", "feed_forward.w2"),
                         ("input_layernorm", "attention_norm"),
                         ("post_attention_layernorm", "ffn_norm")]
    t = cfg.text
    hd, groups = t.kv_channels, t.num_key_value_heads
    out = {}
    for k, x in hf_sd.items():
        if k.startswith("model.vision_tower."):
            k = "vision_model." + k[len("model.vision_tower."):]
            for a, b in vision_renames:
                k = k.replace(a, b)
            if ".attention.q_proj." in k:  # fused [q_all; k_all; v_all]
                parts = [hf_sd[k.replace("vision_model.", "model.vision_tower.")
                               .replace("encoder.layers.", "encoder.layer.")
                               .replace("attention.q_proj", f"attention.{p}_proj")] for p in "qkv"]
                out[k.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts)
                continue
            if ".attention.k_proj." in k or ".attention.v_proj." in k:
                continue
        elif k.startswith("model.multi_modal_projector."):
            k = k.replace("model.multi_modal_projector.", "mlp1.")
            k = k.replace("layer_norm", "0").replace("linear_1", "1").replace("linear_2", "3")
        elif k == "lm_head.weight":
            head = "output" if cfg.llm_arch == "internlm2" else "lm_head"
            k = f"language_model.{head}.weight"
        else:
            k = k.replace("model.language_model.", "language_model.model.")
            if cfg.llm_arch == "internlm2":
                if "self_attn.k_proj" in k or "self_attn.v_proj" in k:
                    continue
                if "self_attn.q_proj" in k:  # InternLM2's wqkv: per KV group (q heads, k, v)
                    q, kk, v = (hf_sd[k.replace("language_model.model.", "model.language_model.")
                                      .replace("q_proj", p + "_proj")] for p in "qkv")
                    h = q.shape[1]
                    x = torch.cat([q.view(groups, -1, hd, h), kk.view(groups, 1, hd, h),
                                   v.view(groups, 1, hd, h)], dim=1).reshape(-1, h)
                    k = k.replace("self_attn.q_proj", "attention.wqkv")
                for a, b in internlm2_renames:
                    k = k.replace(a, b)
        out[k] = x
    return out


def disk_state_dict(hf, tmp_path) -> dict:
    """What transformers' save_pretrained writes (the native on-disk layout)."""
    from safetensors.torch import load_file

    hf.save_pretrained(tmp_path)
    return load_file(os.path.join(tmp_path, "model.safetensors"))


def hf_state_dict(hf, cfg, layout, tmp_path) -> dict:
    sd = hf.state_dict()
    if layout == "chat":
        return chat_state_dict(sd, cfg)
    return disk_state_dict(hf, tmp_path) if layout == "native_disk" else sd


def batch():
    """Two sequences of equal length: an image of 1 tile (4 tokens) and one of 2 tiles (8)."""
    gen = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 990, (n,), generator=gen)  # noqa: E731
    s0 = torch.cat([text(3), torch.full((4,), IMAGE), text(13)])
    s1 = torch.cat([text(5), torch.full((8,), IMAGE), text(7)])
    input_ids = torch.stack([s0, s1])
    pixels = torch.randn(sum(TILES), 3, TILE, TILE, generator=gen)
    position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    return input_ids, pixels, position_ids


def big_tiles():
    """84 px tiles (6x6 patches, pretraining grid 4x4): exercises the bicubic position table."""
    return torch.randn(2, 3, 84, 84, generator=torch.Generator().manual_seed(5))


def grad_probe(shape) -> torch.Tensor:
    """Fixed weights for a scalar loss on the image embeddings."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7))


def vision_grad_errors(model, ref_grads) -> dict:
    """Backward through our tower + projector; per vision tensor, max |our grad - the reference
    global grad's slice for this shard| / max |reference|."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    emb = model.image_embeddings(ref_grads["pixels"])
    (emb * grad_probe(emb.shape)).sum().backward()
    errors = {}
    for sh in nested_values(model.sharded_state_dict()):
        if isinstance(sh, ShardedTensor) and sh.key.startswith(VISION_KEYS):
            pre = sh.prepend_axis_num
            full = ref_grads[(sh.key, tuple(sh.global_offset[:pre]))]
            index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.data.shape))
            err = float((sh.data.grad - full[index]).abs().max() / full.abs().max())
            errors[sh.key] = max(err, errors.get(sh.key, 0.0))
    return errors


def megatron_outputs(models, par, ref_grads):
    """Rank function: for each model, our InternVL from its tensors; logits of one micro-batch
    (last stage), image embeddings of the batch's tiles and of big tiles, and the errors of the
    tower's gradients (first stage)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from eureka_megatron.models.internvl import model as internvl
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    out = {}
    for name, (cfg, tensors, mb) in models.items():
        chunks = internvl.build_internvl_chunks(cfg, par)
        stored = {t.data.untyped_storage().data_ptr()
                  for t in nested_values(chunks[0].sharded_state_dict())
                  if isinstance(getattr(t, "data", None), torch.Tensor)}
        missing = [n for n, p in chunks[0].named_parameters()
                   if p.untyped_storage().data_ptr() not in stored]
        logits, used = fill_and_forward(
            chunks, tensors, mb,
            lambda chunk, b: chunk(b["input_ids"], b["position_ids"], pixel_values=b["pixel_values"]))
        model = chunks[0]
        images = grad_errors = None
        if model.pre_process:
            with torch.no_grad():
                images = (model.image_embeddings(mb["pixel_values"]),
                          model.image_embeddings(big_tiles()))
            grad_errors = vision_grad_errors(model, ref_grads[name])
        out[name] = (logits[..., :VOCAB] if logits is not None else None, images, used, missing,
                     grad_errors)
    return out


def reference(hf, input_ids, pixels):
    with torch.no_grad():
        logits = hf(input_ids=input_ids, pixel_values=pixels).logits.float()
        images = [hf.model.get_image_features(pixel_values=p).pooler_output.flatten(0, 1)
                  for p in (pixels, big_tiles())]
    return logits, images


def reference_vision_grads(hf, cfg, pixels) -> dict:
    """transformers' gradients of the same loss, mapped to megatron global tensors (the mapping
    is linear: permutations and zero padding, exactly what megatron's grads look like)."""
    feats = hf.model.get_image_features(pixel_values=pixels).pooler_output.flatten(0, 1)
    (feats * grad_probe(feats.shape)).sum().backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
             for n, p in hf.named_parameters()}
    hf.zero_grad(set_to_none=True)
    out = internvl_mapping(cfg, "native_memory").to_megatron(grads.__getitem__)
    return {k: g for k, g in out.items() if k[0].startswith(VISION_KEYS)}


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def prepared(tmp_path):
    """{name: (our config with a trainable tower, megatron tensors from its HF layout,
    micro-batch)}, {name: (reference logits, image embeddings, vision grads)}."""
    input_ids, pixels, position_ids = batch()
    mb = {"input_ids": input_ids, "pixel_values": pixels, "position_ids": position_ids}
    models, refs = {}, {}
    for name, layout in MODELS.items():
        cfg = our_config(name)
        cfg.freeze_vision = False
        hf = hf_model(cfg)
        grads = dict(reference_vision_grads(hf, cfg, pixels), pixels=pixels)
        refs[name] = (*reference(hf, input_ids, pixels), grads)
        sd = hf_state_dict(hf, cfg, layout, tmp_path / name)
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
        for ours, ref in zip(images, ref_images):
            assert rel(ours, ref) < 1e-5, (name, rel(ours, ref))
        assert rel(logits, ref_logits) < 1e-5, (name, rel(logits, ref_logits))
        grad_errors = {k: e for r in ranks if r[4] for k, e in r[4].items()}
        assert set(grad_errors) == {k for k, _ in tensors if k.startswith(VISION_KEYS)}, name
        assert max(grad_errors.values()) < 1e-5, (name, grad_errors)


def save_checkpoints(models, par, root):
    """Rank function: each model filled from its HF tensors, saved as a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    from eureka_megatron.models.internvl import model as internvl
    from eureka_megatron.models.init import fill_global_tensors
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    for name, (cfg, tensors, _) in models.items():
        chunks = internvl.build_internvl_chunks(cfg, par)
        fill_global_tensors(chunks, lambda key, layer, shape: tensors[(key, layer)])
        dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, str(root / name))


def load_and_forward(models, par, root):
    """Rank function: each model loaded from its checkpoint; full logits on the last stage."""
    from megatron.core import dist_checkpointing

    from eureka_megatron.models.internvl import model as internvl
    from eureka_megatron.models.forward import forward_logits
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    out = {}
    for name, (cfg, mb) in models.items():
        (chunk,) = internvl.build_internvl_chunks(cfg, par)
        loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict()}, str(root / name))
        chunk.load_state_dict(loaded["model"], strict=True)
        logits = forward_logits([chunk], mb, lambda c, b: c(b["input_ids"], b["position_ids"],
                                                          pixel_values=b["pixel_values"]))
        out[name] = logits[..., :VOCAB] if logits is not None else None
    return out


def test_torch_dist_checkpoint_reshards_tp2_to_pp2(tmp_path):
    """Every parameter (padded qk-norm, layer scales, position table, projector) goes through
    megatron's sharded state dict: saved at TP2, loaded at PP2, still transformers' logits."""
    models, refs = prepared(tmp_path)
    root = tmp_path / "ckpt"
    for name in models:
        (root / name).mkdir(parents=True)
    launch(save_checkpoints, 2, models, ParallelConfig(tensor_parallel=2, nproc=2), root)
    results = launch(load_and_forward, 2, {n: (m[0], m[2]) for n, m in models.items()},
                     ParallelConfig(pipeline_parallel=2, nproc=2), root)
    for name in models:
        logits = next(r[name] for r in results if r[name] is not None)
        assert rel(logits, refs[name][0]) < 1e-5, (name, rel(logits, refs[name][0]))


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
        assert all(torch.equal(back[k], v) for k, v in sd.items()), layout


def chat_config_json(cfg: InternVLConfig) -> dict:
    """An `internvl_chat` config.json as OpenGVLab writes it (the fields we read, and some more)."""
    t, v = cfg.text, cfg.vision
    llm = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
               intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
               num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
               rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, hidden_act="silu",
               max_position_embeddings=t.max_position_embeddings,
               tie_word_embeddings=t.tie_word_embeddings)
    if cfg.llm_arch == "internlm2":
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                   rope_scaling=None)
    elif cfg.llm_arch == "qwen3":  # InternVL3.5
        llm.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=t.head_dim,
                   attention_bias=False, use_sliding_window=False)
    else:
        llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False)
    vision = dict(model_type="intern_vit_6b", hidden_size=v.hidden_size,
                  intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                  num_attention_heads=v.num_attention_heads, norm_type=v.norm_type,
                  layer_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias,
                  qk_normalization=v.qk_normalization, image_size=v.image_size,
                  patch_size=v.patch_size, num_channels=3, hidden_act="gelu", drop_path_rate=0.0)
    return dict(model_type="internvl_chat", architectures=["InternVLChatModel"], llm_config=llm,
                vision_config=vision, downsample_ratio=0.5, select_layer=-1, ps_version="v2",
                force_image_size=v.image_size, template="internvl2_5")


@pytest.mark.parametrize("name", list(MODELS))
def test_config_from_hf_both_formats(name):
    cfg = our_config(name)
    native = json.loads(hf_model(cfg).config.to_json_string())
    assert config_from_hf(native) == cfg
    assert config_from_hf(chat_config_json(cfg), image_token_id=IMAGE) == cfg


def test_config_and_layout_errors():
    from eureka_megatron.models.internvl.model import validate_internvl_layout

    chat = chat_config_json(our_config("internlm2"))
    with pytest.raises(ConfigError, match="image_token_id"):
        config_from_hf(chat)
    tokenizer = {"added_tokens_decoder": {"92545": {"content": "<img>"},
                                          "92546": {"content": "<IMG_CONTEXT>"}}}
    assert image_token_id_from_tokenizer(tokenizer) == 92546
    broken = dict(chat, vision_config={k: v for k, v in chat["vision_config"].items()
                                       if k != "hidden_size"})
    with pytest.raises(ConfigError, match=r"vision_config\.hidden_size"):
        config_from_hf(broken, image_token_id=IMAGE)
    with pytest.raises(ConfigError, match="InternLM3ForCausalLM"):
        config_from_hf(dict(chat, llm_config=dict(chat["llm_config"],
                                                  architectures=["InternLM3ForCausalLM"])), 1)
    with pytest.raises(ConfigError, match="linear"):
        config_from_hf(dict(chat, llm_config=dict(chat["llm_config"],
                                                  rope_scaling={"type": "linear", "factor": 2})), 1)
    with pytest.warns(UserWarning, match="dynamic NTK"):
        config_from_hf(dict(chat, llm_config=dict(chat["llm_config"],
                                                  rope_scaling={"type": "dynamic", "factor": 2})), 1)
    with pytest.raises(MappingError, match="not an InternVL checkpoint"):
        detect_layout({"model.embed_tokens.weight", "lm_head.weight"})
    vit6b = our_config("vit6b")
    vit6b.vision.head_pad_multiple = 5  # 5 heads, unpadded: TP2 cannot split them
    with pytest.raises(ConfigError, match="head_pad_multiple"):
        validate_internvl_layout(vit6b, ParallelConfig(tensor_parallel=2, nproc=2))


def wrong_image_count(cfg, par):
    """Rank function: a batch whose image tokens do not match the tiles must fail clearly."""
    from eureka_megatron.models.internvl import model as internvl
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    (model,) = internvl.build_internvl_chunks(cfg, par)
    input_ids, pixels, position_ids = batch()
    with pytest.raises(ValueError, match="12 image tokens .* 2 tiles give 8 embeddings"):
        model(input_ids, position_ids, pixel_values=pixels[:2])
    return [[p.requires_grad for p in m.parameters()]
            for m in (model.vision_model, model.vision_projection)]


def test_image_token_count_mismatch_and_frozen_tower():
    cfg = our_config("qwen2")
    tower, projector = launch(wrong_image_count, 1, cfg, ParallelConfig())[0]
    assert tower and projector and not any(tower + projector)


def test_trainable_projector_with_a_frozen_tower():
    """MM-Eureka's InternVL runs freeze the vision model only; mlp1 trains."""
    cfg = our_config("qwen2")
    cfg.freeze_projector = False
    tower, projector = launch(wrong_image_count, 1, cfg, ParallelConfig())[0]
    assert not any(tower) and projector and all(projector)
