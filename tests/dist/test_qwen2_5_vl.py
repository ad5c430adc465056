"""Qwen2.5-VL on megatron computes what transformers' Qwen2_5_VLForConditionalGeneration computes.

A tiny random HF model (2-block vision tower with window + full attention and an MLP width of 60,
zero-padded to 128 on the megatron side; 4-layer GQA LLM with
mrope) is mapped into our megatron model; two images of different sizes in one batch; fp32 logits
must match transformers at TP1, TP2, PP2 and TP2xPP2.
"""
import pytest
import torch

from eureka_megatron.config import ParallelConfig
from eureka_megatron.models.qwen2_5_vl import model as vl
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig
from eureka_megatron.models.qwen2_5_vl.hf import qwen2_5_vl_mapping
from eureka_megatron.runtime.launcher import launch
from tests.helpers import fill_and_forward

IMAGE, VSTART, VOCAB = 999, 997, 1000
GRIDS = torch.tensor([[1, 4, 4], [1, 8, 6]])  # patches (t, h, w): 4 and 12 image tokens


def our_config(tie=False) -> Qwen25VLConfig:
    return Qwen25VLConfig(
        text=LLMConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie),
        vision=Qwen25VisionConfig(depth=2, hidden_size=32, intermediate_size=60, num_heads=2,
                                  out_hidden_size=64, window_size=56, fullatt_block_indexes=[1]),
        mrope_section=[2, 3, 3], image_token_id=IMAGE, vision_start_token_id=VSTART)


def hf_model(cfg: Qwen25VLConfig):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    t, v = cfg.text, cfg.vision
    hf_cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                         num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                         max_position_embeddings=512, tie_word_embeddings=t.tie_word_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                          "mrope_section": cfg.mrope_section}),
        vision_config=dict(depth=v.depth, hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_heads=v.num_heads,
                           out_hidden_size=v.out_hidden_size, window_size=v.window_size,
                           fullatt_block_indexes=v.fullatt_block_indexes, patch_size=v.patch_size,
                           spatial_merge_size=v.spatial_merge_size,
                           temporal_patch_size=v.temporal_patch_size),
        image_token_id=IMAGE, video_token_id=998, vision_start_token_id=VSTART,
        tie_word_embeddings=t.tie_word_embeddings)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
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
    n_patches = int(GRIDS.prod(-1).sum())
    pixels = torch.randn(n_patches, 3 * 2 * 14 * 14, generator=gen)
    return input_ids, pixels


def test_index_arithmetic_matches_transformers():
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    grids = torch.tensor([[1, 4, 4], [1, 8, 6], [2, 6, 10]])
    assert torch.equal(vl.vision_rope_positions(grids, 2), get_vision_position_ids(grids, 2))
    order, bounds = vl.window_partition(grids, 2, 112, 14)
    ref_order, ref_bounds = get_vision_window_index(grids, 2, 112, 14)
    assert torch.equal(order, ref_order)
    assert torch.equal(bounds.to(torch.int32), ref_bounds)


def test_mrope_positions_match_transformers():
    cfg = our_config()
    hf = hf_model(cfg)
    input_ids, _ = batch()
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0  # right padding in the second row
    ref, _ = hf.model.get_rope_index(input_ids, (input_ids == IMAGE).int(), GRIDS,
                                     attention_mask=mask)
    ours = vl.mrope_position_ids(input_ids, GRIDS, IMAGE, 2, attention_mask=mask)
    assert torch.equal(ours, ref)


def test_packed_mrope_positions_equal_each_sample_alone():
    """Two samples packed in one row (THD): each gets the positions transformers gives it alone."""
    cfg = our_config()
    hf = hf_model(cfg)
    input_ids, _ = batch()
    s0, s1 = input_ids[0, :20], input_ids[1]
    packed = torch.cat([s0, s1])[None]
    cu = torch.tensor([0, len(s0), len(s0) + len(s1)])
    ours = vl.mrope_position_ids(packed, GRIDS, IMAGE, 2, cu_seqlens=cu)
    alone = [hf.model.get_rope_index(s[None], (s[None] == IMAGE).int(), g[None])[0]
             for s, g in ((s0, GRIDS[0]), (s1, GRIDS[1]))]
    assert torch.equal(ours, torch.cat(alone, dim=2))


def megatron_logits(cfg, par, tensors, mb):
    """Rank function: our Qwen2.5-VL from `tensors`, forward one micro-batch, full logits."""
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    chunks = vl.build_qwen2_5_vl_chunks(cfg, par)
    logits, used = fill_and_forward(
        chunks, tensors, mb,
        lambda chunk, b: chunk(b["input_ids"], b["position_ids"], pixel_values=b["pixel_values"],
                               image_grid_thw=b["image_grid_thw"]))
    return (logits[..., :VOCAB] if logits is not None else None), used


@pytest.mark.parametrize("tp,pp,first,sp", [(1, 1, None, False), (2, 1, None, False),
                                            (1, 2, None, False), (2, 2, None, False),
                                            (1, 2, 1, False), (2, 1, None, True)],
                         ids=["tp1", "tp2", "pp2", "tp2_pp2", "pp2_uneven_1_3", "tp2_sp"])
def test_logits_match_transformers(tp, pp, first, sp):
    cfg = our_config()
    hf = hf_model(cfg)
    input_ids, pixels = batch()
    with torch.no_grad():
        ref = hf(input_ids=input_ids, pixel_values=pixels, image_grid_thw=GRIDS,
                 mm_token_type_ids=(input_ids == IMAGE).int()).logits.float()
    sd = hf.state_dict()
    tensors = qwen2_5_vl_mapping(cfg, layout="memory").to_megatron(sd.__getitem__)
    mb = {"input_ids": input_ids, "pixel_values": pixels, "image_grid_thw": GRIDS,
          "position_ids": vl.mrope_position_ids(input_ids, GRIDS, IMAGE, 2)}
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp,
                         first_stage_layers=first,  # vision + 1 LLM layer | 3 LLM layers
                         sequence_parallel=sp)
    results = launch(megatron_logits, tp * pp, cfg, par, tensors, mb)
    logits = next(r[0] for r in results if r[0] is not None)
    assert set().union(*(r[1] for r in results)) == set(tensors)
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, float(rel)


def test_mapping_round_trip_both_layouts():
    cfg = our_config()
    hf = hf_model(cfg)
    mem = hf.state_dict()
    disk = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
            for k, v in mem.items()}
    for layout, sd in (("memory", mem), ("disk", disk)):
        m = qwen2_5_vl_mapping(cfg, layout)
        assert m.hf_names() == set(sd), layout
        back = m.to_hf(m.to_megatron(sd.__getitem__))
        assert all(torch.equal(back[k], v) for k, v in sd.items()), layout
