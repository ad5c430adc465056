"""Qwen3-VL-MoE on megatron computes what transformers' Qwen3VLMoeForConditionalGeneration computes.

A tiny random HF model -- test_qwen3_vl's tower (3 blocks, MLP width 60 zero-padded to 128, a 4x4
position table, DeepStack from blocks 0 and 2) on a 4-layer Qwen3-MoE LLM (hidden 48, 4 heads of
head_dim 24 != 48 / 4, GQA 2, 8 experts of width 32, top-2 renormalised; routers ~ N(0, 0.5) and
every 1-D tensor randomised) with interleaved mrope [6, 3, 3] -- goes through the qwen3_vl_moe
family; two images of different sizes in one batch; fp32 logits must match transformers at TP1,
TP2 (+SP, which megatron's MoE layer needs under TP), PP2, TP2 x PP2, EP2 and TP2 x EP2. The
mapping round trip is bit-exact in both expert layouts (transformers' in-memory stack, which
save_pretrained also writes, and the hub's transposed stack, which transformers loads back), also
through `convert` both ways, and the layout is told from the shapes. The hub configs (30B-A3B, 235B-A22B) read right; layouts the
experts do not fit fail before any rank starts, naming the key.
"""
import dataclasses
import functools

import pytest
import torch

from eureka_megatron.bench.convert import QWEN3_VL_30B_A3B, QWEN3_VL_235B_A22B
from eureka_megatron.config import ParallelConfig
from eureka_megatron.convert.hf_io import HFCheckpoint
from eureka_megatron.errors import ConfigError
from eureka_megatron.models.family import TensorNames
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.mapping import MappingError
from eureka_megatron.models.qwen3_vl.config import Qwen3VLConfig, Qwen3VLVisionConfig
from eureka_megatron.models.qwen3_vl_moe import FAMILY
from eureka_megatron.models.registry import family_for
from eureka_megatron.runtime.launcher import launch
from tests.dist.test_qwen3_vl import GRIDS, IMAGE, VOCAB, VSTART, batch, megatron_logits

HIDDEN, EXPERTS, TOPK, WIDTH = 48, 8, 2, 32


def our_config() -> Qwen3VLConfig:
    return Qwen3VLConfig(
        text=LLMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=24, qk_norm=True, qkv_bias=False, rope_theta=10000.0,
                       max_position_embeddings=512, num_experts=EXPERTS,
                       moe_intermediate_size=WIDTH, num_experts_per_tok=TOPK, norm_topk_prob=True),
        vision=Qwen3VLVisionConfig(depth=3, hidden_size=32, intermediate_size=60, num_heads=2,
                                   out_hidden_size=HIDDEN, num_position_embeddings=16,
                                   deepstack_visual_indexes=[0, 2]),
        mrope_section=[6, 3, 3], image_token_id=IMAGE, vision_start_token_id=VSTART)


def hf_config(cfg: Qwen3VLConfig):
    from transformers import Qwen3VLMoeConfig

    t, v = cfg.text, cfg.vision
    c = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                         num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
                         num_experts=t.num_experts, num_experts_per_tok=t.num_experts_per_tok,
                         moe_intermediate_size=t.moe_intermediate_size,
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
        tie_word_embeddings=False)
    c._attn_implementation = "eager"
    return c


@functools.lru_cache(maxsize=1)
def hf_model():
    from transformers import Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(hf_config(our_config())).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF inits norms to ones, biases and routers to zeros: randomise them
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@functools.lru_cache(maxsize=1)
def reference():
    input_ids, pixels = batch()
    with torch.no_grad():
        logits = hf_model()(input_ids=input_ids, pixel_values=pixels, image_grid_thw=GRIDS,
                            mm_token_type_ids=(input_ids == IMAGE).int()).logits.float()
    return input_ids, pixels, logits


@functools.lru_cache(maxsize=1)
def megatron_tensors():
    return FAMILY.mapping(our_config(), "memory").to_megatron(hf_model().state_dict().__getitem__)


def test_config_from_hf_reads_the_tiny_model():
    hf = hf_model()
    assert type(hf).__name__ == FAMILY.hf_class and family_for(hf.config.to_dict()) is FAMILY
    assert FAMILY.config_from_hf(hf.config.to_dict(), None) == our_config()
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()
    # the renormalisation is not a key of Qwen3-VL-MoE's config: always on
    text = {**hf.config.to_dict()["text_config"], "norm_topk_prob": False}
    text.pop("model_type")
    assert FAMILY.config_from_hf({**hf.config.to_dict(), "text_config": text}).text.norm_topk_prob
    with pytest.raises(ConfigError, match="num_experts"):
        dense = {k: v for k, v in text.items() if k != "num_local_experts"}
        FAMILY.config_from_hf({**hf.config.to_dict(), "text_config": dense})


@pytest.mark.parametrize("hub,want", [
    (QWEN3_VL_30B_A3B, dict(experts=128, topk=8, width=768, hidden=2048, layers=48, heads=32,
                            kv=4, active=3.35e9, total=30.5e9)),
    (QWEN3_VL_235B_A22B, dict(experts=128, topk=8, width=1536, hidden=4096, layers=94, heads=64,
                              kv=4, active=22.2e9, total=235.1e9)),
], ids=["30b_a3b", "235b_a22b"])
def test_config_from_hub_constants(hub, want):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    fam = family_for(hub)
    assert fam is FAMILY
    cfg = fam.config_from_hf(hub, None)
    t, v = cfg.text, cfg.vision
    assert (t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size, t.hidden_size,
            t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == tuple(
        want[k] for k in ("experts", "topk", "width", "hidden", "layers", "heads", "kv"))
    assert t.norm_topk_prob and t.qk_norm and not t.qkv_bias and t.kv_channels == 128
    assert t.moe_aux_loss_coeff == 0.0 and not t.tie_word_embeddings and t.rope_theta == 5e6
    assert abs(t.num_active_parameters() - want["active"]) < 0.01e9
    assert abs(t.num_parameters() - want["total"]) < 0.1e9
    assert cfg.mrope_section == [24, 20, 20] and v.deepstack_visual_indexes == [8, 16, 24]
    assert (v.depth, v.patch_size, v.out_hidden_size) == (27, 16, want["hidden"])
    # the mapping names what transformers builds from the same file (meta, no weights), in both
    # layouts, and its hub-layout shapes are the transposed stacks
    with torch.device("meta"):
        model = Qwen3VLMoeForConditionalGeneration(Qwen3VLMoeConfig.from_dict(hub))
    sd = model.state_dict()
    assert FAMILY.mapping(cfg, "memory").hf_names() == set(sd) == FAMILY.mapping(cfg, "disk").hf_names()
    assert FAMILY.detect_layout(sd) == "memory"
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert tuple(sd[gate_up].shape) == (want["experts"], 2 * want["width"], want["hidden"])
    # TP4 (SP) x PP2 x EP8 on 64 ranks: 16 experts a rank, DeepStack's layers on stage 0
    FAMILY.check_layout(cfg, ParallelConfig(tensor_parallel=4, pipeline_parallel=2,
                                            expert_parallel=8, sequence_parallel=True, nproc=64))


LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 1), "pp2": (1, 2, 1), "tp2_pp2": (2, 2, 1),
           "ep2": (1, 1, 2), "tp2_ep2": (2, 1, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_match_transformers(layout):
    tp, pp, ep = LAYOUTS[layout]
    cfg = our_config()
    input_ids, pixels, ref = reference()
    tensors = megatron_tensors()
    mb = FAMILY.prepare(cfg, {"input_ids": input_ids, "pixel_values": pixels,
                              "image_grid_thw": GRIDS})
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                         nproc=tp * pp * ep, sequence_parallel=tp > 1)
    FAMILY.check_layout(cfg, par)
    results = launch(megatron_logits, par.nproc, cfg, par, tensors, mb)
    logits = next(r[0] for r in results if r[0] is not None)
    assert set().union(*(r[1] for r in results)) == set(tensors)  # every expert landed somewhere
    rel = (logits - ref).abs().max() / ref.abs().max()
    assert rel < 1e-5, float(rel)


def hub_layout(sd: dict) -> dict:
    """The hub's naming: the same names, each expert's matrix transposed."""
    return {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj",
                                                              "experts.down_proj")) else v
            for k, v in sd.items()}


def hf_layout_tensors(layout: str) -> dict:
    """The tiny model's HF tensors in `layout` ("memory": its state_dict, "disk": the hub's)."""
    sd = hf_model().state_dict()
    return sd if layout == "memory" else hub_layout(sd)


def test_mapping_round_trip_each_layout(tmp_path):
    """HF -> megatron -> HF is bit-exact in both layouts; save_pretrained writes the in-memory
    stack, transformers loads the hub's transposed stack back to the same model, and the
    layout is told from the checkpoints' shapes."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3VLMoeForConditionalGeneration

    cfg = our_config()
    model = hf_model()
    sd = model.state_dict()
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    assert tuple(sd[gate_up].shape) == (EXPERTS, 2 * WIDTH, HIDDEN)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(sd) and all(torch.equal(saved[k], v) for k, v in sd.items())
    assert FAMILY.detect_layout(HFCheckpoint(tmp_path / "saved").names) == "memory"
    disk = hub_layout(sd)
    megatron = None
    for layout, tensors in (("memory", sd), ("disk", disk)):
        assert FAMILY.detect_layout(TensorNames.of(tensors)) == layout
        assert FAMILY.detect_layout(tensors) == layout
        mapping = FAMILY.mapping(cfg, layout)
        assert mapping.hf_names() == set(tensors), layout
        got = mapping.to_megatron(tensors.__getitem__)
        if megatron is None:
            megatron = got
        assert set(got) == set(megatron) and all(torch.equal(got[k], megatron[k]) for k in got)
        back = mapping.to_hf(megatron)
        assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
        source = mapping.source(tensors.__getitem__)
        assert all(torch.equal(source(k, off, tuple(t.shape)), t) for (k, off), t in megatron.items())
    # our hub-layout export, loaded by transformers, is the model again
    hub_dir = tmp_path / "hub"
    model.config.save_pretrained(hub_dir)
    exported = FAMILY.mapping(cfg, "disk").to_hf(megatron)
    save_file({k: v.contiguous() for k, v in exported.items()}, str(hub_dir / "model.safetensors"),
              metadata={"format": "pt"})
    assert FAMILY.detect_layout(HFCheckpoint(hub_dir).names) == "disk"
    loaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(hub_dir).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_loading_reads_only_the_experts_a_rank_holds(tmp_path):
    """The trainer's HF source at expert parallelism: each expert's matrix is read alone from its
    stacked tensor (`HFCheckpoint.expert`), in either layout, and equals what the whole stack
    gives; no stacked tensor is read whole."""
    from safetensors.torch import save_file

    cfg = our_config()
    model = hf_model()
    sd = model.state_dict()
    model.save_pretrained(tmp_path / "memory")
    (tmp_path / "disk").mkdir()
    model.config.save_pretrained(tmp_path / "disk")
    save_file({k: v.contiguous() for k, v in hub_layout(sd).items()},
              str(tmp_path / "disk" / "model.safetensors"), metadata={"format": "pt"})
    for layout in ("memory", "disk"):
        ckpt = HFCheckpoint(tmp_path / layout)
        mapping = FAMILY.mapping(cfg, layout)
        want = mapping.to_megatron(ckpt.get)
        whole = []

        def get(name):
            whole.append(name)
            return ckpt.get(name)

        source = mapping.source(get, ckpt.expert)
        experts = {k: t for k, t in want.items() if len(k[1]) == 2}
        assert len(experts) == 4 * EXPERTS * 2  # layers x experts x (fc1, fc2)
        rank1 = {k: t for k, t in experts.items() if k[1][1] >= EXPERTS // 2}  # EP2's rank 1
        assert all(torch.equal(source(k, off, tuple(t.shape)), t) for (k, off), t in rank1.items())
        assert not [n for n in whole if n.endswith(("gate_up_proj", "down_proj"))], layout
        gate_up = "model.language_model.layers.3.mlp.experts.gate_up_proj"
        row, count = ckpt.expert(gate_up, 5)
        assert count == EXPERTS and torch.equal(row, ckpt.get(gate_up)[5])
        with pytest.raises(ValueError, match="no expert 8"):
            ckpt.expert(gate_up, 8)
    wrong = FAMILY.mapping(dataclasses.replace(
        cfg, text=dataclasses.replace(cfg.text, num_experts=2 * EXPERTS)), "memory")
    key, off = next(k for _, _, k, _ in wrong.entries() if len(k[1]) == 2 and k[1][1] == 9)
    memory = HFCheckpoint(tmp_path / "memory")
    with pytest.raises(MappingError, match=f"stacks {EXPERTS} experts, the model has {2 * EXPERTS}"):
        wrong.source(memory.get, lambda n, e: memory.expert(n, e - EXPERTS))(key, off, ())


def test_converter_round_trip_each_layout(tmp_path):
    """`convert` hf -> megatron -> hf on a save_pretrained directory and on a hub-layout one:
    each detected from its safetensors headers, each written back in its own layout bit for bit."""
    from safetensors.torch import load_file, save_file

    from eureka_megatron.convert.run import hf_to_megatron, megatron_to_hf

    model = hf_model()
    model.save_pretrained(tmp_path / "memory")
    model.config.save_pretrained(tmp_path / "disk")
    save_file(hf_layout_tensors("disk"), str(tmp_path / "disk" / "model.safetensors"),
              metadata={"format": "pt"})
    for layout in ("memory", "disk"):
        summary = hf_to_megatron(tmp_path / layout, tmp_path / f"{layout}_mg", progress=False)
        assert summary["layout"] == layout
        megatron_to_hf(tmp_path / f"{layout}_mg", tmp_path / f"{layout}_back", progress=False)
        back = {k: v for f in (tmp_path / f"{layout}_back").glob("*.safetensors")
                for k, v in load_file(f).items()}
        want = hf_layout_tensors(layout)
        assert set(back) == set(want) and all(torch.equal(back[k], v) for k, v in want.items())


def test_detect_layout_needs_shapes_and_fitting_stacks():
    sd = hf_model().state_dict()
    with pytest.raises(MappingError, match="needs the tensors' shapes"):
        FAMILY.detect_layout(set(sd))
    # square gate_up (2I == H): down_proj still tells the layouts apart
    shapes = {n: tuple(t.shape) for n, t in sd.items()}
    names = "model.language_model.layers.0.mlp.experts."
    for layout, g, d in (("memory", (8, 64, 64), (8, 64, 32)), ("disk", (8, 64, 64), (8, 32, 64))):
        s = {**shapes, names + "gate_up_proj": g, names + "down_proj": d}
        assert FAMILY.detect_layout(TensorNames(s, s.__getitem__)) == layout
    s = {**shapes, names + "down_proj": (8, 48, 48)}
    with pytest.raises(MappingError, match="neither"):
        FAMILY.detect_layout(TensorNames(s, s.__getitem__))
    per_expert = {n for n in sd if ".mlp.experts." not in n} | {names + "0.up_proj.weight"}
    with pytest.raises(MappingError, match="stacked"):
        FAMILY.detect_layout(per_expert)


@pytest.mark.parametrize("par,key", [
    (dict(expert_parallel=3, nproc=3), "parallel.expert_parallel"),
    (dict(expert_parallel=16, nproc=16), "parallel.expert_parallel"),
    (dict(tensor_parallel=2, nproc=2), "parallel.sequence_parallel"),
    (dict(pipeline_parallel=2, first_stage_layers=1, nproc=2), "parallel.first_stage_layers"),
], ids=["ep3_of_8", "ep16_of_8", "tp2_without_sp", "deepstack_off_stage_0"])
def test_bad_layouts_fail_before_ranks_start(par, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        FAMILY.check_layout(our_config(), ParallelConfig(**par))


def test_trainable_sets_the_run_switches():
    section = dataclasses.make_dataclass("M", [("freeze_vision", bool), ("moe_aux_loss_coeff", float)])
    cfg = FAMILY.trainable(our_config(), section(False, 0.01))
    assert not cfg.freeze_vision and cfg.text.moe_aux_loss_coeff == 0.01
