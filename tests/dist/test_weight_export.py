"""Weight export from live Megatron shards: HF tensors equal the original HF checkpoint bit for bit.

A tiny random HF model is loaded into our megatron model at TP2 x PP2 / TP2 / DP2 (the same
`fill_global_tensors` path as checkpoint loading); `export_hf_weights` must give back exactly the
HF state dict: every name, shape and dtype, QKV / gate-up un-fused, vocab, MLP and head padding
removed, tied embeddings exported once, the vision tower included.
"""
import pytest
import torch

from eureka_megatron.config import ParallelConfig
from eureka_megatron.models.registry import FAMILIES
from eureka_megatron.runtime.launcher import launch

FAMILY = {f.name: f for f in FAMILIES}


def export_rank(family_name, cfg, par, layout, tensors, dest, dtype):
    from eureka_megatron.models.init import fill_global_tensors
    from eureka_megatron.rollout.weight_export import export_hf_weights
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    fam = FAMILY[family_name]
    chunks = fam.build_chunks(cfg, par)
    fill_global_tensors(chunks, lambda key, layer, shape: tensors[(key, layer)])
    if dtype != torch.float32:
        chunks = [c.to(dtype) for c in chunks]
    return list(export_hf_weights(chunks, fam.mapping(cfg, layout), dest=dest))


def qwen2_case(tie):
    from tests.dist.test_llm_vs_transformers import hf_model, llm_config_of
    from tests.helpers import tiny_config

    hf = hf_model(tie)
    return "qwen2", llm_config_of(hf, tiny_config()).model, "causal_lm", hf.state_dict()


def qwen2_5_vl_case():
    from tests.dist.test_qwen2_5_vl import hf_model, our_config

    cfg = our_config()
    return "qwen2_5_vl", cfg, "memory", hf_model(cfg).state_dict()


def internvl_case():
    from tests.dist.test_internvl import hf_model, our_config

    cfg = our_config("vit6b")  # 5 vision heads zero-padded to 8 on the megatron side
    return "internvl", cfg, "native_memory", hf_model(cfg).state_dict()


def qwen3_vl_moe_case(layout):
    """transformers' stacked experts ("memory") or the hub's transposed ones ("disk": SGLang's
    sync, HF exports)."""
    from tests.dist.test_qwen3_vl_moe import hf_layout_tensors, our_config

    return "qwen3_vl_moe", our_config(), layout, hf_layout_tensors(layout)


CASES = {
    "qwen2_tied_tp2_pp2": (lambda: qwen2_case(True), 2, 2, 1, "rank0", torch.float32),
    "qwen2_untied_dp2_all_bf16": (lambda: qwen2_case(False), 1, 1, 2, "all", torch.bfloat16),
    "qwen2_5_vl_tp2_pp2": (qwen2_5_vl_case, 2, 2, 1, "rank0", torch.float32),
    "qwen2_5_vl_tp2": (qwen2_5_vl_case, 2, 1, 1, "rank0", torch.float32),
    "internvl_vit6b_tp2_pp2": (internvl_case, 2, 2, 1, "rank0", torch.float32),
    # experts split over EP2 (DP2), each layer's stacked HF tensors assembled from both ranks, in
    # the hub's transposed layout (SGLang's); Qwen3-VL's tower and DeepStack mergers on stage 0.
    # transformers' in-memory layout at EP2: tests/dist/test_engine_sync.py
    "qwen3_vl_moe_hub_layout_ep2_pp2": (lambda: qwen3_vl_moe_case("disk"), 1, 2, 2, "rank0",
                                        torch.float32, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_returns_the_hf_checkpoint(case):
    make, tp, pp, dp, dest, dtype, *ep = CASES[case]
    family, cfg, layout, sd = make()
    tensors = FAMILY[family].mapping(cfg, layout).to_megatron(sd.__getitem__)
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp * dp,
                         expert_parallel=ep[0] if ep else 1)
    results = launch(export_rank, par.nproc, family, cfg, par, layout, tensors, dest, dtype)
    receivers = [r for r in results if r]
    assert len(receivers) == (par.nproc if dest == "all" else 1)
    tied = getattr(getattr(cfg, "text", cfg), "tie_word_embeddings", False)
    want = {k: v.to(dtype) for k, v in sd.items() if not (tied and k == "lm_head.weight")}
    for stream in receivers:
        names = [n for n, _ in stream]
        assert len(names) == len(set(names))  # every HF tensor exactly once
        got = dict(stream)
        assert set(got) == set(want)
        for name, t in want.items():
            assert got[name].dtype == dtype, name
            assert torch.equal(got[name], t), name
