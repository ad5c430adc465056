"""Qwen3-VL on megatron computes what transformers' Qwen3VLForConditionalGeneration computes.

A tiny random HF model -- a 3-block vision tower with LayerNorms, a GELU-tanh MLP of width 60
(zero-padded to 128 on the megatron side), a 4x4 learned position table resampled to each
image's grid, DeepStack from blocks 0 and 2; a 4-layer Qwen3 LLM (GQA, q/k norms, head_dim 24 !=
64 / 4) with interleaved mrope [6, 3, 3] -- is mapped into our megatron model; two images of
different sizes in one batch; fp32 logits must match transformers at TP1, TP2, PP2, TP2xPP2 and
TP2 with sequence parallelism. Also: the index arithmetic (position-table taps, interleaved rope,
3-D positions with padding and packing) against transformers' own functions, the image
preprocessing against transformers' processor, the mapping round trip, config.json reading, the
DeepStack layout check, and packed / shared-image batches and sequence parallelism through the
training step (log-probs, loss, gradients of the tower).
"""
import dataclasses
import functools
import json

import pytest
import torch

from eureka_megatron.config import ParallelConfig
from eureka_megatron.errors import ConfigError
from eureka_megatron.models.images import ImageOptions
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.qwen3_vl import FAMILY, hf as q3hf
from eureka_megatron.models.qwen3_vl.config import (Qwen3VLConfig, Qwen3VLVisionConfig,
                                                    validate_qwen3_vl_layout)
from eureka_megatron.models.qwen3_vl.hf import qwen3_vl_mapping
from eureka_megatron.runtime.launcher import launch
from tests.helpers import fill_and_forward

IMAGE, VSTART, VOCAB = 999, 997, 1000
GRIDS = torch.tensor([[1, 4, 4], [1, 8, 6]])  # patches (t, h, w): 4 and 12 image tokens
PATCH_DIM = 3 * 2 * 16 * 16


def our_config(tie=False) -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text=LLMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24, qk_norm=True,
                       qkv_bias=False, rope_theta=10000.0, tie_word_embeddings=tie,
                       max_position_embeddings=512),
        vision=Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=60, num_heads=2,
                                   out_hidden_size=64, num_position_embeddings=16,
                                   deepstack_visual_indexes=[0, 2]),
        mrope_section=[6, 3, 3], image_token_id=IMAGE, vision_start_token_id=VSTART)


def hf_config(cfg: Qwen3VLConfig):
    from transformers import Qwen3VLConfig as HFConfig

    t, v = cfg.text, cfg.vision
    c = HFConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                         num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
                         rms_norm_eps=t.rms_norm_eps, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": cfg.mrope_section,
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_heads=v.num_heads,
                           out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size,
                           temporal_patch_size=v.temporal_patch_size,
                           num_position_embeddings=v.num_position_embeddings,
                           deepstack_visual_indexes=list(v.deepstack_visual_indexes)),
        image_token_id=IMAGE, video_token_id=998, vision_start_token_id=VSTART,
        tie_word_embeddings=t.tie_word_embeddings)
    c._attn_implementation = "eager"
    return c


@functools.lru_cache(maxsize=2)
def hf_model(tie=False):
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(hf_config(our_config(tie))).eval()
    with torch.no_grad():  # randomise constant-initialised norms and biases to test their mapping
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def batch():
    """Two sequences of equal length, one image each (4 and 12 tokens)."""
    gen = torch.Generator().manual_seed(3)
    text = lambda n: torch.randint(0, 990, (n,), generator=gen)  # noqa: E731
    s0 = torch.cat([text(3), torch.tensor([VSTART]), torch.full((4,), IMAGE), text(16)])
    s1 = torch.cat([text(5), torch.tensor([VSTART]), torch.full((12,), IMAGE), text(6)])
    input_ids = torch.stack([s0, s1])
    pixels = torch.randn(int(GRIDS.prod(-1).sum()), PATCH_DIM, generator=gen)
    return input_ids, pixels


def hf_logits(input_ids, pixels, grids, attention_mask=None):
    with torch.no_grad():
        return hf_model()(input_ids=input_ids, pixel_values=pixels, image_grid_thw=grids,
                          attention_mask=attention_mask,
                          mm_token_type_ids=(input_ids == IMAGE).int()).logits.float()


def megatron_tensors(cfg=None, model=None):
    sd = (model or hf_model()).state_dict()
    return qwen3_vl_mapping(cfg or our_config(), "memory").to_megatron(sd.__getitem__)


# --- index arithmetic vs transformers -----------------------------------------------------------


def test_position_table_taps_match_transformers():
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from eureka_megatron.models.qwen3_vl.model import position_interpolation

    grids = torch.tensor([[1, 4, 4], [1, 8, 6], [2, 6, 10], [1, 2, 2], [1, 64, 2]])
    for side in (4, 48):
        idx, w = position_interpolation(grids, side, 2)
        ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
            grids, num_grid_per_side=side, mode="bilinear", align_corners=True,
            spatial_merge_size=2)
        assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w), side


def test_interleaved_mrope_matches_transformers():
    from eureka_megatron.models.qwen3_vl.model import InterleavedMRoPE

    cfg = our_config()
    rope = hf_model().model.language_model.rotary_emb
    pos = torch.stack([torch.arange(26), torch.arange(26) % 5, torch.arange(26) * 3 % 7])
    pos = pos[:, None].expand(3, 2, -1).clone()
    pos[:, 1] += 4
    cos, sin = rope(torch.zeros(1, dtype=torch.float32), pos)  # [B, S, head_dim]
    ours = InterleavedMRoPE(cfg.text.kv_channels, cfg.text.rope_theta, cfg.mrope_section)(pos)
    assert ours.shape == (26, 2, 1, 24)
    assert torch.equal(ours[:, :, 0].transpose(0, 1).cos(), cos)
    assert torch.equal(ours[:, :, 0].transpose(0, 1).sin(), sin)
    # the real model's 128-dim head and [24, 20, 20]: T H W interleaved, T for the last 4
    from eureka_megatron.models.qwen3_vl.model import interleaved_axes
    axes = interleaved_axes(64, [24, 20, 20]).tolist()
    assert axes[:6] == [0, 1, 2, 0, 1, 2] and axes[60:] == [0] * 4
    assert [axes.count(a) for a in range(3)] == [24, 20, 20]


def test_mrope_positions_match_transformers():
    from eureka_megatron.models.qwen3_vl.model import mrope_position_ids

    input_ids, _ = batch()
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0  # right padding in the second row
    mask[0, :2] = 0  # left padding in the first
    types = (input_ids == IMAGE).int()
    ref, _ = hf_model().model.get_rope_index(input_ids, types, GRIDS, attention_mask=mask)
    ours = mrope_position_ids(input_ids, GRIDS, IMAGE, 2, attention_mask=mask)
    assert torch.equal(ours, ref)
    prepared = FAMILY.prepare(our_config(), {"input_ids": input_ids, "attention_mask": mask,
                                             "image_grid_thw": GRIDS})
    assert torch.equal(prepared["position_ids"], ref)


def test_packed_mrope_positions_equal_each_sample_alone():
    """Two samples packed in one row (THD): each gets the positions transformers gives it alone."""
    input_ids, _ = batch()
    s0, s1 = input_ids[0, :20], input_ids[1]
    packed = torch.cat([s0, s1])[None]
    cu = torch.tensor([0, len(s0), len(s0) + len(s1)])
    ours = FAMILY.prepare(our_config(), {"input_ids": packed, "image_grid_thw": GRIDS,
                                         "cu_seqlens": cu})["position_ids"]
    alone = [hf_model().model.get_rope_index(s[None], (s[None] == IMAGE).int(), g[None])[0]
             for s, g in ((s0, GRIDS[0]), (s1, GRIDS[1]))]
    assert torch.equal(ours, torch.cat(alone, dim=2))


# --- the model vs transformers ------------------------------------------------------------------


def megatron_logits(cfg, par, tensors, mb):
    """Rank function: our Qwen3-VL from `tensors`, forward one micro-batch, full logits."""
    from eureka_megatron.models.qwen3_vl.model import build_qwen3_vl_chunks
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    chunks = build_qwen3_vl_chunks(cfg, par)
    logits, used = fill_and_forward(chunks, tensors, mb, lambda c, b: FAMILY.call(cfg, c, b))
    return (logits[..., :VOCAB] if logits is not None else None), used


# sequence parallelism: test_sequence_parallel_train_step_equals_tp2
@pytest.mark.parametrize("tp,pp,sp", [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False)],
                         ids=["tp1", "tp2", "pp2", "tp2_pp2"])
def test_logits_match_transformers(tp, pp, sp):
    cfg = our_config()
    input_ids, pixels = batch()
    ref = hf_logits(input_ids, pixels, GRIDS)
    tensors = megatron_tensors()
    mb = FAMILY.prepare(cfg, {"input_ids": input_ids, "pixel_values": pixels,
                              "image_grid_thw": GRIDS})
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp,
                         sequence_parallel=sp)
    results = launch(megatron_logits, tp * pp, cfg, par, tensors, mb)
    logits = next(r[0] for r in results if r[0] is not None)
    assert set().union(*(r[1] for r in results)) == set(tensors)
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, float(rel)


def several_batches(cfg, tensors):
    """Rank function (one rank): logits of (padded rows, a packed row, rows sharing images)."""
    from eureka_megatron.models.qwen3_vl.model import build_qwen3_vl_chunks
    from eureka_megatron.runtime.distributed import init_distributed

    par = ParallelConfig()
    init_distributed(par)
    chunks = build_qwen3_vl_chunks(cfg, par)
    input_ids, pixels = batch()
    s0, s1 = input_ids[0, :20], input_ids[1]
    out = {}
    mask = torch.ones_like(input_ids)
    mask[0, 20:] = 0
    padded = FAMILY.prepare(cfg, {"input_ids": input_ids, "attention_mask": mask,
                                  "pixel_values": pixels, "image_grid_thw": GRIDS})
    out["padded"] = fill_and_forward(chunks, tensors, padded, lambda c, b: FAMILY.call(cfg, c, b))[0]
    cu = torch.tensor([0, len(s0), len(s0) + len(s1)])
    packed = FAMILY.prepare(cfg, {"input_ids": torch.cat([s0, s1])[None], "pixel_values": pixels,
                                  "image_grid_thw": GRIDS, "cu_seqlens": cu})
    packed["cu_seqlens"] = cu
    out["packed"] = fill_and_forward(chunks, tensors, packed, lambda c, b: FAMILY.call(cfg, c, b))[0]
    # rows 0 and 1 both show image 1 (12 tokens); the tower runs on it once (image_index)
    shared_ids = torch.stack([input_ids[1], input_ids[1].roll(3)])
    shared = FAMILY.prepare(cfg, {"input_ids": shared_ids, "pixel_values": pixels[16:],
                                  "image_grid_thw": GRIDS[[1, 1]]})  # positions: per row's image
    shared["image_grid_thw"] = GRIDS[1:]  # the tower: the one distinct image
    shared["image_index"] = torch.arange(12).repeat(2)
    out["shared"] = fill_and_forward(chunks, tensors, shared, lambda c, b: FAMILY.call(cfg, c, b))[0]
    return {k: v[..., :VOCAB] for k, v in out.items()}


def test_packed_and_shared_image_batches_match_transformers():
    """A packed row (THD, positions restarting, DeepStack at the packed image positions) and
    rows sharing one tower pass (`image_index`) give transformers' logits of each row alone /
    with its own copy of the image."""
    cfg = our_config()
    input_ids, pixels = batch()
    (out,) = launch(several_batches, 1, cfg, megatron_tensors())
    s0, s1 = input_ids[0:1, :20], input_ids[1:2]
    ref0 = hf_logits(s0, pixels[:16], GRIDS[:1])[0]
    ref1 = hf_logits(s1, pixels[16:], GRIDS[1:])[0]
    shared_ids = torch.stack([input_ids[1], input_ids[1].roll(3)])
    ref_shared = hf_logits(shared_ids, torch.cat([pixels[16:], pixels[16:]]), GRIDS[[1, 1]])

    def close(a, b, what):
        rel = (a - b).abs().max() / b.abs().max()
        assert rel < 1e-5, (what, float(rel))

    close(out["padded"][0, :20], ref0, "padded row 0")
    close(out["padded"][1], ref1, "padded row 1")
    close(out["packed"][0, :20], ref0, "packed sequence 0")
    close(out["packed"][0, 20:], ref1, "packed sequence 1")
    close(out["shared"], ref_shared, "shared image")


def test_deepstack_layers_must_be_on_the_first_stage():
    cfg = our_config()  # 2 DeepStack levels, 4 LLM layers
    validate_qwen3_vl_layout(cfg, ParallelConfig(pipeline_parallel=2, nproc=2))
    validate_qwen3_vl_layout(cfg, ParallelConfig(pipeline_parallel=2, nproc=2, first_stage_layers=2))
    with pytest.raises(ConfigError, match="parallel.first_stage_layers"):
        validate_qwen3_vl_layout(cfg, ParallelConfig(pipeline_parallel=2, nproc=2,
                                                     first_stage_layers=1))
    with pytest.raises(ConfigError, match="pipeline_parallel=4"):
        validate_qwen3_vl_layout(cfg, ParallelConfig(pipeline_parallel=4, nproc=4))
    with pytest.raises(ConfigError, match="first_stage_layers"):
        validate_qwen3_vl_layout(cfg, ParallelConfig(pipeline_parallel=2, nproc=2,
                                                     virtual_pipeline=2))


# --- checkpoints and config.json ----------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_mapping_round_trip_both_layouts(tie, tmp_path):
    """HF -> megatron -> HF is bit-exact; save_pretrained writes the in-memory names."""
    from safetensors import safe_open

    cfg = our_config(tie)
    model = hf_model(tie)
    sd = model.state_dict()
    tied = {"lm_head.weight"} if tie else set()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert on_disk == set(sd) - tied
    assert q3hf.detect_layout(on_disk) == q3hf.detect_layout(set(sd)) == "memory"
    for layout in ("memory", "disk"):
        m = qwen3_vl_mapping(cfg, layout)
        assert m.hf_names() == set(sd) - tied, layout
        back = m.to_hf(m.to_megatron(sd.__getitem__))
        assert all(torch.equal(back[k], sd[k]) for k in m.hf_names()), layout
    saved = json.loads((tmp_path / "config.json").read_text())
    assert q3hf.config_from_hf(saved) == cfg


def hub_config() -> dict:
    """Qwen/Qwen3-VL-8B-Instruct's config.json as published (transformers 4.57 era)."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
        "model_type": "qwen3_vl", "tie_word_embeddings": False, "video_token_id": 151656,
        "vision_end_token_id": 151653, "vision_start_token_id": 151652,
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
            "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12288,
            "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
            "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                             "rope_type": "default"},
            "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
        "vision_config": {
            "deepstack_visual_indexes": [8, 16, 24], "depth": 27,
            "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
            "initializer_range": 0.02, "intermediate_size": 4304, "model_type": "qwen3_vl",
            "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 4096,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
    }


def test_config_from_hub_config():
    cfg = FAMILY.config_from_hf(hub_config(), None)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_hidden_layers, t.num_key_value_heads, t.kv_channels) == (4096, 36, 8, 128)
    assert t.qk_norm and not t.qkv_bias and t.rope_theta == 5e6 and not t.tie_word_embeddings
    assert cfg.mrope_section == [24, 20, 20]
    assert (v.depth, v.hidden_size, v.num_heads, v.patch_size) == (27, 1152, 16, 16)
    assert v.num_grid_per_side == 48 and v.deepstack_visual_indexes == [8, 16, 24]
    assert v.padded_intermediate_size == 4352 and v.out_hidden_size == 4096
    assert FAMILY.image_options_from_hf(hub_config(), {}) == {
        "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
        "min_pixels": 65536, "max_pixels": 16777216}  # the hub preprocessor_config.json's, for a
    # checkpoint without one
    # 36 layers over PP4: 9 on the first stage >= 3 DeepStack levels
    validate_qwen3_vl_layout(cfg, ParallelConfig(tensor_parallel=8, pipeline_parallel=4, nproc=32))
    # what HF builds from the same file: the mapping covers its tensors (meta, no weights)
    from transformers import Qwen3VLConfig as HFConfig, Qwen3VLForConditionalGeneration
    with torch.device("meta"):
        names = set(Qwen3VLForConditionalGeneration(HFConfig.from_dict(hub_config())).state_dict())
    assert qwen3_vl_mapping(cfg, "disk").hf_names() == names


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.pop("vision_config"), "missing vision_config"),
    (lambda c: c.pop("text_config"), "missing text_config"),
    (lambda c: c["vision_config"].pop("deepstack_visual_indexes"), "deepstack_visual_indexes"),
    (lambda c: c["vision_config"].update(hidden_act="silu"), "hidden_act 'silu'"),
    (lambda c: c["vision_config"].update(num_position_embeddings=2300), "not a square"),
    (lambda c: c["vision_config"].update(deepstack_visual_indexes=[8, 27]), "below depth=27"),
    (lambda c: c["text_config"]["rope_scaling"].update(rope_type="yarn"), "rope_type 'yarn'"),
    (lambda c: c["text_config"].pop("num_hidden_layers"), "num_hidden_layers"),
    (lambda c: c["vision_config"].update(out_hidden_size=2048), "out_hidden_size=2048"),
])
def test_config_errors_name_the_key(edit, match):
    c = hub_config()
    edit(c)
    with pytest.raises(ConfigError, match=match):
        FAMILY.config_from_hf(c, None)


# --- image preprocessing ------------------------------------------------------------------------


@pytest.mark.parametrize("size,pixels", [((300, 200), {}), ((64, 900), {}), ((333, 517), {}),
                                         ((640, 480), {"max_pixels": 128 * 128})],
                         ids=["300x200", "64x900", "333x517", "640x480_capped"])
def test_preprocessing_matches_transformers(size, pixels):
    """Our pixels and grids equal transformers' PIL processor configured as Qwen3-VL's
    preprocessor_config.json (16x16 patches, mean = std = 0.5, 65536..16777216 pixels)."""
    import numpy as np
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    size_cfg = {"shortest_edge": 65536, "longest_edge": pixels.get("max_pixels", 16777216)}
    proc = Qwen2VLImageProcessorPil(size=size_cfg, patch_size=16, temporal_patch_size=2,
                                    merge_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(size[0])
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = proc(images=[im, im.transpose(Image.Transpose.ROTATE_90)], return_tensors="pt")
    options = ImageOptions(**FAMILY.image_options_from_hf(hub_config(), {}) | pixels)
    mm, tokens = FAMILY.image_inputs([im, im.transpose(Image.Transpose.ROTATE_90)], options)
    assert torch.equal(mm["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(mm["pixel_values"], ref["pixel_values"])
    assert tokens == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]


# --- the training step: packed rows, shared images, sequence parallelism -----------------------


def train_step(par_kwargs: list[dict], width_multiple: int = 1):
    """Rank function: for each layout in `par_kwargs` (same ranks, same weights; they may differ
    in sequence parallelism), the log-probs, loss and trainable gradients (tower included) of
    one RL step over rollout-like sequences: 3 prompts with images x 2 responses (rows of a
    prompt share its tower pass). A layout's "recompute" is the build's activation recompute;
    "pack": True runs the step on packed rows too."""
    from eureka_megatron.config import AlgoConfig, OptimConfig
    from eureka_megatron.models.forward import forward_token_logprobs
    from eureka_megatron.models.init import layout_invariant_init
    from eureka_megatron.models.llm import building
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.batches import Sequence, micro_batches
    from eureka_megatron.trainer.policy_forward import policy_forward
    from eureka_megatron.trainer.train_step import run_forward_backward, wrap_for_training

    cfg = dataclasses.replace(our_config(), freeze_vision=False)
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for g, grid in enumerate(([1, 4, 4], [1, 4, 8], [1, 8, 6])):
        mm = {"pixel_values": torch.randn(grid[1] * grid[2], PATCH_DIM, generator=gen),
              "image_grid_thw": torch.tensor([grid])}
        prompt = [1, VSTART] + [IMAGE] * (grid[1] * grid[2] // 4) + torch.randint(
            8, 60, (g + 1,), generator=gen).tolist()
        for j in range(2):
            resp = torch.randint(8, 60, (2 + 3 * j + g,), generator=gen).tolist()
            seqs.append(Sequence(prompt, resp, mm, [-1.0] * len(resp), group=g))
    advantages = torch.linspace(-1.5, 2.0, len(seqs))
    out = []
    layouts = [dict(kw) for kw in par_kwargs]
    recompute = [kw.pop("recompute", "none") for kw in layouts]
    pack = [kw.pop("pack", False) for kw in layouts]
    init_distributed(ParallelConfig(**layouts[0]), seed=1)
    for kw, mode, pack_too in zip(layouts, recompute, pack):
        par = ParallelConfig(**kw)
        with building(recompute=mode):
            chunks = FAMILY.build_chunks(cfg, par)
        layout_invariant_init(chunks, seed=3, std=0.1)
        chunks[0].config.variable_seq_lengths = True
        model = wrap_for_training(chunks, OptimConfig(), bf16=False, decay_steps=10)
        loss = policy_forward(AlgoConfig(kl_coef=0.0), VOCAB,
                              call=lambda c, mb: FAMILY.call(cfg, c, mb))
        res = {}
        for packed in ([False, True] if pack_too else [False]):
            mbs = micro_batches(seqs, 64, 0, lambda x: FAMILY.prepare(cfg, x), IMAGE,
                                width_multiple, pack=packed)
            for mb in mbs:
                mb["advantages"] = advantages[mb["sequences"]]
            assert any(mb.get("image_index") is not None for mb in mbs)  # shared tower passes
            lps = forward_token_logprobs(model.chunks, mbs, lambda c, mb: FAMILY.call(cfg, c, mb),
                                         VOCAB)
            per_seq = {i: lp[row][mb["loss_mask"][row] != 0]
                       for lp, mb in zip(lps, mbs) for row, i in enumerate(mb["sequences"])}
            for c in model.chunks:
                c.zero_grad_buffer()
            sums = run_forward_backward(model, mbs, loss)
            grads = {n: p.main_grad.clone() for c in model.chunks for n, p in c.named_parameters()
                     if p.requires_grad}
            res["packed" if packed else "padded"] = dict(logprobs=per_seq, loss=sums["loss_sum"],
                                                         grads=grads)
        out.append(res)
    return out


def assert_same_step(a: dict, b: dict, what: str):
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-6, atol=0)
    assert a["grads"].keys() == b["grads"].keys()
    assert any("deepstack_mergers" in n for n in a["grads"])
    for n, g in a["grads"].items():
        diff = float((b["grads"][n] - g).norm())
        assert diff <= 1e-6 * float(g.norm()) + 1e-12, (what, n, diff, float(g.norm()))
    for i, lp in a["logprobs"].items():
        torch.testing.assert_close(b["logprobs"][i], lp, rtol=1e-6, atol=1e-6)


def test_packed_and_full_recompute_train_steps_equal_plain():
    """Packed rows (THD) give the padded rows' log-probs, loss and gradients -- DeepStack's
    included -- with rows sharing their prompt's tower pass; and under full activation recompute
    DeepStack's additions are recomputed with their layers (they ride in the decoder's saved
    `context`): the same again. One launch for both (suite time)."""
    ((plain, full),) = launch(train_step, 1, [dict(pack=True), dict(recompute="full")])
    assert_same_step(plain["padded"], plain["packed"], "packed")
    deep = [n for n in plain["padded"]["grads"] if "deepstack_mergers" in n]
    assert all(plain["padded"]["grads"][n].abs().sum() > 0 for n in deep)
    assert_same_step(plain["padded"], full["padded"], "full recompute")


def test_sequence_parallel_train_step_equals_tp2():
    """TP2 with sequence parallelism gives TP2's log-probs, loss and every rank's gradients: each
    rank adds DeepStack to its slice of the sequence, the tower's gradient is summed over TP."""
    layouts = [dict(tensor_parallel=2, nproc=2), dict(tensor_parallel=2, nproc=2,
                                                      sequence_parallel=True)]
    for plain, sp in launch(train_step, 2, layouts, 2):
        assert_same_step(plain["padded"], sp["padded"], "sequence parallel")


def test_train_dry_run_refuses_a_layout_without_deepstack_on_stage_0(tmp_path):
    """`train` checks the family's layout rules before any rank starts (loop.describe)."""
    from eureka_megatron.config import load_rl_config
    from eureka_megatron.trainer.loop import describe

    (tmp_path / "config.json").write_text(json.dumps(hub_config()))
    base = [f"model.hf={tmp_path}", "parallel.pipeline_parallel=2", "parallel.nproc=2"]
    assert "qwen3_vl" in describe(load_rl_config(None, base))
    cfg = load_rl_config(None, base + ["parallel.first_stage_layers=2"])
    with pytest.raises(ConfigError, match="first 3 LLM layers.*parallel.first_stage_layers >= 3"):
        describe(cfg)
