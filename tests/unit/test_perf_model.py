"""The performance model (bench/perf_model.py) against hand-computed values on a small made-up
model, its assumption checks, and the CLI table for one recipe (bench/perf_recipes.py: the model
counted from its meta build)."""
import dataclasses
import json
from pathlib import Path

import pytest

from eureka_megatron.bench import perf_model as pm
from eureka_megatron.cli import main
from eureka_megatron.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# A made-up LLM (no vision): N = 1e6 matmul parameters, 2 layers x 4 heads x 8 dims, 2 KV heads.
SHAPE = pm.ModelShape(name="tiny", params=1_200_000, llm_matmul=1_000_000, vision=0, projector=0,
                      vision_trainable=False, layers=2, heads=4, kv_heads=2, head_dim=8,
                      vit_tokens_per_image_token=0, image_tokens=0.0)
RECIPE = pm.Recipe(name="tiny", tp=1, pp=1, dp=2, gpus_per_node=8, colocated=True, engines=1,
                   gpus_per_engine=1, transport="tensor", ray_engines=False, engine_nodes=(0,),
                   stage_params=(1_200_000,), stage_sharded=(1_000_000,), prompts=4,
                   samples=2, mini_batches=2, epochs=1, micro_batch_tokens=1000, max_new_tokens=50,
                   online_filter=False, max_filter_rounds=4, old_logprobs=True, ref_logprobs=False,
                   recompute="none", off_policy=False, reward_workers=2, grad_buffer=1_000_000,
                   optimizer_shard=500_000)
# Every response 50 tokens (mean = longest), prompts 100 tokens of text: sequences of exactly 150.
A = pm.Assumptions(prompt_text_tokens=100, mean_response_tokens=50, longest_response_tokens=50)
SEQS, LEN = 8, 150
ATTN = 2 * 2 * 4 * 8 * LEN**2  # causal forward per sequence: 2 x layers x heads x dim x L^2


def test_training_flops_are_6NT_plus_attention_forward_and_backward():
    phase = pm.training(SHAPE, RECIPE, A, 100, 0, 50)
    assert phase.flops == 6 * 1_000_000 * SEQS * LEN + 3 * SEQS * ATTN  # 7.2e9 + 69,120,000
    assert phase.flops == 7_269_120_000
    # 2 mini-batches of 4 x 150 tokens per step; per DP rank 2 x 150 = 300 <= 1000: one micro-batch
    assert phase.seconds == pytest.approx(phase.flops / (2 * 989e12 * 0.4))
    full = pm.training(SHAPE, dataclasses.replace(RECIPE, recompute="full"), A, 100, 0, 50)
    assert full.flops == 8 * 1_000_000 * SEQS * LEN + 4 * SEQS * ATTN  # one more forward


def test_logprob_pass_is_2NT_plus_attention_and_pipeline_bubble():
    phase = pm.logprob_pass(SHAPE, RECIPE, A, 100, 0, 50, "old log-probs")
    assert phase.flops == 2 * 1_000_000 * SEQS * LEN + SEQS * ATTN
    pp2 = dataclasses.replace(RECIPE, pp=2, dp=1)  # 8 x 150 tokens = 2 micro-batches: (2 + 1) / 2
    assert pm.bubble(pp2, SEQS, LEN) == (1.5, 2)
    assert pm.logprob_pass(SHAPE, pp2, A, 100, 0, 50, "x").seconds == pytest.approx(
        phase.flops / (2 * 989e12 * 0.4) * 1.5)


def test_decode_time_is_bytes_over_bandwidth_when_memory_bound():
    """4 sequences, 10 steps, each step reads the bf16 weights and every sequence's KV cache."""
    seconds, hbm_share, kv_bytes = pm.decode_seconds(SHAPE, 4, 100, 10, 10, 1, A)
    kv_per_token = 2 * 2 * 2 * 8 * 2  # K and V x layers x KV heads x dim x bf16 = 128 B
    assert SHAPE.kv_bytes_per_token == kv_per_token
    assert kv_bytes == 4 * sum(100 + t for t in range(10)) * kv_per_token  # 535,040 B
    assert seconds == pytest.approx((10 * 2_000_000 + 535_040) / (3.35e12 * 0.6))
    assert hbm_share == 1.0
    two_gpus, _, _ = pm.decode_seconds(SHAPE, 4, 100, 10, 10, 2, A)  # TP2: half the bytes each
    assert two_gpus == pytest.approx(seconds / 2)


def test_decode_turns_compute_bound_for_a_large_batch():
    seconds, hbm_share, _ = pm.decode_seconds(SHAPE, 1_000_000, 0, 1, 1, 1, A)
    assert hbm_share == 0.0
    assert seconds == pytest.approx(1_000_000 * 2 * 1_000_000 / (989e12 * 0.5))


def test_moe_counts_active_parameters_and_decode_reads_the_experts_touched():
    """A MoE with 800k of expert parameters over 8 experts, top 2 (k/E = 1/4): a token multiplies
    the 200k dense ones and a quarter of the experts; a decode step of n running sequences reads
    the dense weights and 1 - (3/4)^n of the experts (uniform routing)."""
    moe = dataclasses.replace(SHAPE, llm_matmul=200_000 + 800_000 // 4, expert_params=800_000,
                              expert_share=0.25)
    assert moe.decode_weight_bytes(1) == 2 * moe.llm_matmul  # one token: its own 2 experts
    assert moe.decode_weight_bytes(2) == pytest.approx(2 * (200_000 + 800_000 * (1 - 0.75**2)))
    assert moe.decode_weight_bytes(1000) == pytest.approx(2 * 1_000_000)  # every expert
    assert SHAPE.decode_weight_bytes(1000) == 2 * SHAPE.llm_matmul  # dense: the same every step
    # training and log-prob FLOPs follow the active parameters
    dense = pm.training(dataclasses.replace(SHAPE, llm_matmul=moe.llm_matmul), RECIPE, A, 100, 0, 50)
    assert pm.training(moe, RECIPE, A, 100, 0, 50).flops == dense.flops
    # 4 sequences decoding 10 steps: 1 - (3/4)^4 = 68% of the experts read each step
    seconds, _, kv = pm.decode_seconds(moe, 4, 100, 10, 10, 1, A)
    assert seconds == pytest.approx((10 * moe.decode_weight_bytes(4) + kv) / (3.35e12 * 0.6))


def test_active_parameters_of_the_hub_moe():
    """Qwen3-VL-235B-A22B from its hub config.json (meta build): ~22B of ~236B parameters are
    active -- the LLM's attention, router and 8 of 128 experts, plus the tower."""
    from eureka_megatron.bench.perf_recipes import load_recipe

    shape, recipe = load_recipe(ROOT / "examples" / "qwen3_vl_235b_a22b.yaml", [])
    assert 230e9 < shape.params < 240e9
    assert shape.expert_share == 8 / 128 and 220e9 < shape.expert_params < 230e9
    assert 20e9 < shape.llm_matmul + shape.vision + shape.projector < 23e9
    assert recipe.stage_params and sum(recipe.stage_params) == shape.params


def test_response_law_has_the_stated_mean_and_longest():
    k = pm.response_shape(800, 4096)
    assert 4096 / (k + 1) == pytest.approx(800)
    assert pm.mean_square_length(100, 50, 50) == 150**2  # every response at the longest
    with pytest.raises(ConfigError, match="exceeds the longest"):
        pm.response_shape(5000, 4096)


def test_online_filter_rounds_follow_the_collector_rule():
    on = dataclasses.replace(RECIPE, prompts=128, online_filter=True)
    assert pm.filter_rounds(on, pm.Assumptions(filter_keep_rate=0.6)) == [128, 86]
    assert pm.filter_rounds(on, pm.Assumptions(filter_keep_rate=1.0)) == [128]
    assert len(pm.filter_rounds(on, pm.Assumptions(filter_keep_rate=0.01))) == 4  # max rounds
    assert pm.filter_rounds(RECIPE, pm.Assumptions(filter_keep_rate=0.1)) == [4]  # filter off


# The sync's layout: TP2 x PP2, 1.2e6 parameters (2.4 MB bf16), stage 0 700k (600k TP-split),
# stage 1 500k (400k TP-split). A TP all-gather brings a sender the other half of its stage's
# split tensors: 2 B x (600k + 400k) x (1 - 1/2) = 1 MB over NVLink at 450 GB/s x 0.8.
SYNC = dataclasses.replace(RECIPE, tp=2, pp=2, dp=1, engines=2, gpus_per_engine=2,
                           stage_params=(700_000, 500_000), stage_sharded=(600_000, 400_000))
W = 2 * 1_200_000
GATHER = 1_000_000 / (450e9 * 0.8)


def sync_seconds(r, a=A):
    return {name: t for name, (t, _) in pm.sync_terms(SHAPE, r, a).items()}


def test_broadcast_sync_is_each_stage_once_to_all_engines():
    """Engines on another node: each stage's sender broadcasts its stage once over IB, whatever
    the number of engines (a pipelined broadcast, not one copy per engine)."""
    r = dataclasses.replace(SYNC, transport="distributed", colocated=False, engine_nodes=(1, 1))
    assert r.stage_node(0) == r.stage_node(1) == 0  # TP2 x DP1: both senders on node 0
    bcast = W / (50e9 * 0.165)
    assert sync_seconds(r) == pytest.approx({"TP all-gather": GATHER, "broadcast": bcast})
    phase = pm.weight_sync(SHAPE, r, A)
    assert phase.seconds == pytest.approx(GATHER + bcast) and phase.bound == "IB"
    four = dataclasses.replace(r, engines=4, engine_nodes=(1, 1, 2, 2))
    assert pm.weight_sync(SHAPE, four, A).seconds == pytest.approx(phase.seconds)
    local = dataclasses.replace(r, engine_nodes=(0, 0))  # engines on the senders' node: NVLink
    assert sync_seconds(local)["broadcast"] == pytest.approx(W / (450e9 * 0.165))
    # stage s: its gather + its broadcast; received two stages at once: the sum halves
    t0 = 2 * 300_000 / (450e9 * 0.8) + 2 * 700_000 / (50e9 * 0.165)
    t1 = 2 * 200_000 / (450e9 * 0.8) + 2 * 500_000 / (50e9 * 0.165)
    both = pm.weight_sync(SHAPE, r, dataclasses.replace(A, sync_parallel_stages=2)).seconds
    assert both == pytest.approx(max(t0, t1, (t0 + t1) / 2))


def test_tensor_sync_through_ray_pickles_per_engine_and_crosses_nodes_by_object_store():
    """Colocated on 2 nodes of 4 GPUs (TP2 x PP2 x DP2): stage 1's sender is on node 1, so its
    tensors reach rank 0 over IB; rank 0 pickles every bucket for each of the 2 engines, the
    engine on node 1 gets it through Ray's object store, each actor loads its server by IPC."""
    r = dataclasses.replace(SYNC, dp=2, gpus_per_node=4, ray_engines=True, engine_nodes=(0, 1))
    assert r.stage_node(1) == 1 and r.engines_on_first_node == 1
    want = {"TP all-gather": GATHER,
            "stages to rank 0 (IB)": 2 * 500_000 / (50e9 * 0.8),
            "pickled on rank 0": 2 * W / 4e9,
            "Ray object store": 1 * W / 2e9,
            "unpickled in the actor": W / 4e9,
            "CUDA-IPC load": W / (450e9 * 0.165)}
    assert sync_seconds(r) == pytest.approx(want)
    phase = pm.weight_sync(SHAPE, r, A)
    assert phase.seconds == pytest.approx(sum(want.values())) and phase.bound == "host copies"
    slow = dataclasses.replace(A, ray_object_gb_s=1.0)  # the largest part names the bound
    assert pm.weight_sync(SHAPE, r, slow).bound == "Ray (TCP)"
    assert "1 on other nodes by Ray's object store" in phase.detail
    one_node = dataclasses.replace(r, gpus_per_node=8, engine_nodes=(0, 0))  # no TCP, NVLink send
    got = sync_seconds(one_node)
    assert "Ray object store" not in got
    assert got["stages to rank 0 (NVLink)"] == pytest.approx(2 * 500_000 / (450e9 * 0.8))


def test_tensor_sync_in_process_is_ipc_reads_of_rank0_by_every_engine():
    r = dataclasses.replace(SYNC, engine_nodes=(0, 0))
    assert sync_seconds(r) == pytest.approx({
        "TP all-gather": GATHER, "stages to rank 0 (NVLink)": 2 * 500_000 / (450e9 * 0.8),
        "CUDA-IPC load": 2 * W / (450e9 * 0.165)})
    with pytest.raises(ConfigError, match="one entry per PP stage"):
        pm.sync_terms(SHAPE, dataclasses.replace(r, stage_params=(1_200_000,)), A)


def test_stage_exports_split_the_model_by_pipeline_stage():
    from eureka_megatron.bench.perf_recipes import stage_exports
    from eureka_megatron.trainer.memory_plan import ParamEntry

    entries = [ParamEntry("emb", 100, True, None, False, True),
               ParamEntry("vision", 40, True, None, False, False),
               ParamEntry("l0.qkv", 30, True, 0, False, True),
               ParamEntry("l0.norm", 2, False, 0, False, True),
               ParamEntry("l1.qkv", 30, True, 1, False, True),
               ParamEntry("final_norm", 2, False, None, True, True),
               ParamEntry("output", 100, True, None, True, True)]
    assert stage_exports(entries, [[[0]], [[1]]]) == [(172, 170), (132, 130)]
    assert stage_exports(entries, [[[0, 1]]]) == [(304, 300)]


def test_doubling_mfu_halves_the_compute_phases_only():
    slow = {p.name: p.seconds for p in pm.predict(SHAPE, RECIPE, A).phases}
    fast = {p.name: p.seconds for p in pm.predict(SHAPE, RECIPE,
                                                   dataclasses.replace(A, mfu=0.8)).phases}
    for name in ("old log-probs", "train"):
        assert fast[name] == pytest.approx(slow[name] / 2)
    for name in ("generation", "rewards", "optimizer + DP grads", "weight sync"):
        assert fast[name] == slow[name]


def test_step_sums_the_phases_and_off_policy_overlaps_rollout_when_disaggregated():
    p = pm.predict(SHAPE, RECIPE, A)
    assert p.step_seconds == pytest.approx(sum(ph.seconds for ph in p.phases))
    assert p.tokens == SEQS * LEN
    assert p.tokens_per_s_per_gpu == pytest.approx(SEQS * LEN / p.step_seconds / 2)
    off = dataclasses.replace(RECIPE, off_policy=True, colocated=False)
    q = {ph.name: ph.seconds for ph in pm.predict(SHAPE, off, A).phases}
    rollout = q["generation"] + q["rewards"]
    learn = q["old log-probs"] + q["train"] + q["optimizer + DP grads"]
    step = pm.predict(SHAPE, off, A).step_seconds
    assert step == pytest.approx(max(rollout, learn) + q["weight sync"])


@pytest.mark.parametrize("items, message", [
    (["mfux=0.5"], "unknown perf-model assumption 'mfux'"),
    (["mfu=fast"], "mfu='fast' is not a number"),
    (["mfu=1.5"], "mfu=1.5 is a share"),
    (["reward_ms=-1"], "must be a number > 0"),
    (["mean_response_tokens=nan"], "must be a number > 0"),
    (["mfu"], "expected NAME=VALUE"),
])
def test_bad_assumptions_are_refused_by_name(items, message):
    with pytest.raises(ConfigError, match=message):
        pm.parse_assumptions(items)


def test_cli_prints_the_table_for_a_recipe(tmp_path, capsys):
    out = tmp_path / "perf.json"
    assert main(["bench", "perf-model", str(ROOT / "examples/qwen2_5_vl_7b.yaml"),
                 "--mfu", "0.3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "### perf-model on paper" in printed
    assert "| qwen2_5_vl_7b (on paper) |" in printed and "tokens/s/GPU" in printed
    assert "| qwen2_5_vl_7b | weight sync |" in printed and "| mfu | 0.3 |" in printed
    (row,) = json.loads(out.read_text())["perf-model"]["rows"]
    assert round(row["params"] / 1e9, 2) == 8.30  # the planner's count (the recipe's header)
    assert row["assumptions"]["mfu"] == 0.3 and row["GPUs"] == 8
    assert row["time (s)"] == pytest.approx(sum(p["seconds"] for p in row["phases"]))
    sync = next(p for p in row["phases"] if p["phase"] == "weight sync")
    assert sync["how"].startswith("16.6 GB of bf16 weights; tensors through Ray")  # all 8.30B


def test_cli_names_a_bad_assumption_and_a_misplaced_option(capsys):
    assert main(["bench", "perf-model", "mfux=0.5"]) == 2
    assert "unknown perf-model assumption 'mfux'" in capsys.readouterr().err
    assert main(["bench", "rewards", "--mfu", "0.5"]) == 2
    assert "--mfu is an option of `bench perf-model`" in capsys.readouterr().err


def test_generation_is_prefill_at_engine_mfu_plus_the_decode():
    prefill = 4 * (2 * 1_000_000 * 100 + 2 * 2 * 4 * 8 * 100**2)  # 4 prompts on the one engine
    decode, _, _ = pm.decode_seconds(SHAPE, 8, 100, 50, 50, 1, A)
    phase = pm.generation(SHAPE, RECIPE, A, 100, 0, 50)
    assert phase.seconds == pytest.approx(prefill / (989e12 * 0.5) + decode)
    two = dataclasses.replace(RECIPE, prompts=128, online_filter=True)  # rounds of 128 + 86
    detail = pm.generation(SHAPE, two, A, 100, 0, 50).detail
    assert "2 online-filter rounds: 128 + 86 prompts x 2" in detail
