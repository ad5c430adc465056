"""The memory planner's numbers are what megatron allocates.

Per rank of a real gloo layout (TP1, TP2 x DP2, PP2 x DP2, TP2 x PP2): the parameters with and
without gradients, the DDP param/grad buffers (with megatron's padding) and the distributed
optimizer's state equal `memory_plan.stage_params` exactly, for Qwen2.5-VL (frozen tower; tied
embeddings split over PP), InternVL with InternViT-6B's padded, TP-sharded heads and Qwen3-MoE
with its experts over EP2 at TP2 (megatron's second set of buffers, split over ETP = TP). And the activations a
forward leaves for the backward pass (the bytes of every tensor autograd saved, parameters
excluded) match `layer_activation_elements` within 1% at TP1 and TP2, for every recompute mode.
"""
from __future__ import annotations

import pytest
import torch

from eureka_megatron.config import OptimConfig, ParallelConfig
from eureka_megatron.config.rl import PolicyModelConfig
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.registry import family_named
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer import memory_plan

LAYOUTS = {"tp1": (1, 1, 1), "tp2_dp2": (2, 1, 4), "pp2_dp2": (1, 2, 4), "tp2_pp2": (2, 2, 4),
           "tp2_ep2": (2, 1, 4, 2)}  # (TP, PP, nproc[, EP]): experts over EP2 x ETP2


def model_case(name: str):
    """(family, model config with the recipe's freezing, tied embeddings)."""
    if name == "qwen3_moe":
        from tests.dist.test_moe import hf_model, our_config
        return family_named("qwen3_moe"), our_config(hf_model()).model, False
    if name.startswith("qwen2_5_vl"):
        from tests.dist.test_qwen2_5_vl import our_config
        cfg, fam = our_config(tie=name.endswith("tied")), family_named("qwen2_5_vl")
    else:
        from tests.dist.test_internvl import our_config
        cfg, fam = our_config("vit6b"), family_named("internvl")
    cfg = fam.trainable(cfg, PolicyModelConfig(hf="unused", freeze_vision=True))
    return fam, cfg, cfg.text.tie_word_embeddings


def _allocated(name: str, par: ParallelConfig, bf16: bool) -> dict:
    """Rank function: build and wrap the policy as the actor does; count what it holds."""
    from megatron.core import parallel_state as ps

    from eureka_megatron.models.llm import building
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.checkpoint import _inner_optimizers
    from eureka_megatron.trainer.train_step import wrap_for_training

    init_distributed(par, seed=1)
    fam, cfg, _ = model_case(name)
    with building(initialize=False):
        chunks = fam.build_chunks(cfg, par)
    params = [p for c in chunks for p in c.parameters()]
    model = wrap_for_training(chunks, OptimConfig(), bf16=bf16, decay_steps=10)
    # dense and (MoE) expert-parallel param/grad buffers
    buffers = [b for ddp in model.chunks for b in ddp.buffers + ddp.expert_parallel_buffers]
    optimizer = 0
    for opt in _inner_optimizers(model.optimizer):
        opt._init_optimizer_states_with_dummy_values()
        for state in opt.optimizer.state.values():
            optimizer += sum(t.numel() for k, t in state.items() if k in ("exp_avg", "exp_avg_sq"))
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            optimizer += sum(p.numel() for p in group)  # bf16: the fp32 main copies
    return {"pp": ps.get_pipeline_model_parallel_rank(),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(p.numel() for p in params if not p.requires_grad),
            "buffer": sum(b.numel for b in buffers),
            "grad_bytes": sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers),
            "param_bytes": sum(b.param_data.numel() * b.param_data.element_size() for b in buffers),
            "optimizer": optimizer}


# every layout for one model; tied embeddings where PP splits them; InternViT-6B's sharded heads
CASES = [("qwen2_5_vl", layout) for layout in ("tp1", "tp2_dp2", "pp2_dp2", "tp2_pp2")] + [
    ("qwen2_5_vl_tied", "pp2_dp2"), ("internvl_vit6b", "tp2_dp2"), ("qwen3_moe", "tp2_ep2")]


@pytest.mark.parametrize("name,layout", CASES, ids=[f"{n}-{l}" for n, l in CASES])
def test_planned_weights_grads_and_optimizer_equal_the_built_model(name, layout):
    tp, pp, nproc, *ep = LAYOUTS[layout]
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=nproc,
                         expert_parallel=ep[0] if ep else 1, sequence_parallel=bool(ep) and tp > 1)
    fam, cfg, tied = model_case(name)
    entries = memory_plan.inventory(fam, cfg)
    layers = memory_plan.stage_layers(getattr(cfg, "text", cfg), par)
    measured = launch(_allocated, nproc, name, par, False)
    for stage in range(pp):
        plan = memory_plan.stage_params(entries, layers[stage], stage, par, tied, True)
        ranks = [m for m in measured if m["pp"] == stage]
        for m in ranks:
            assert (m["trainable"], m["frozen"], m["buffer"]) == (plan.trainable, plan.frozen, plan.buffer)
            assert m["grad_bytes"] == plan.buffer * 4 and m["param_bytes"] == plan.buffer * 4
        # fp32 weights: the optimizer shard is Adam's m and v (the main params are the weights)
        assert max(m["optimizer"] for m in ranks) == 2 * plan.optimizer
    assert any(e.tp_split for e in entries)
    assert any(e.expert for e in entries) if ep else any(not e.trainable for e in entries)


def test_planned_bf16_optimizer_keeps_fp32_main_copies():
    par = ParallelConfig(tensor_parallel=2, pipeline_parallel=1, nproc=4, bf16=True)
    fam, cfg, tied = model_case("qwen2_5_vl")
    plan = memory_plan.stage_params(memory_plan.inventory(fam, cfg),
                                    memory_plan.stage_layers(cfg.text, par)[0], 0, par, tied, True)
    measured = launch(_allocated, 4, "qwen2_5_vl", par, True)
    assert max(m["optimizer"] for m in measured) == 3 * plan.optimizer  # main, m, v
    assert all(m["param_bytes"] == plan.buffer * 2 and m["grad_bytes"] == plan.buffer * 4
               for m in measured)


# --- activations ------------------------------------------------------------------------------

TEXT = LLMConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2)


def _saved_bytes(par: ParallelConfig, recompute: str, seq_len: int, rows: int) -> int:
    """Rank function: bytes of the tensors one forward (with the fused log-probs) leaves for
    the backward pass, parameters excluded; then the backward runs."""
    from megatron.core.pipeline_parallel.schedules import custom_backward

    from eureka_megatron.models.llm import building
    from eureka_megatron.models.logprobs import final_hidden_states, token_logprobs
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par, seed=1)
    with building(recompute=recompute):
        (model,) = family_named("qwen2").build_chunks(TEXT, par)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, TEXT.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(seq_len).expand(rows, -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with final_hidden_states(model):
            hidden = model(ids, pos, attention_mask=None)
        lp, _ = token_logprobs(model, hidden, ids, TEXT.vocab_size)
        loss = -lp.sum()
    custom_backward(loss, torch.ones_like(loss))  # megatron's own (keeps the CPU device mode)
    return sum(saved.values())


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2_sp"])
def test_activation_estimate_matches_what_autograd_keeps(tp, sp, recompute):
    par = ParallelConfig(tensor_parallel=tp, nproc=tp, sequence_parallel=sp)
    rows, seq_len = 1, 128
    measured = launch(_saved_bytes, tp, par, recompute, seq_len, rows)[0]
    estimate = memory_plan.stage_activation_bytes(TEXT, par, TEXT.num_hidden_layers, 0,
                                                  rows * seq_len, seq_len, recompute, "unfused",
                                                  4, 1)
    assert abs(estimate - measured) <= 0.01 * measured, (estimate, measured)
