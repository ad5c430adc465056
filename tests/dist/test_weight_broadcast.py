"""The disaggregated weight sync on gloo ranks, into a fake SGLang server that really joins the
weight-update groups and receives the broadcasts.

A tiny Qwen2 is loaded into our megatron model at PP2 (bf16) and TP2 x PP2; every sync goes
through `sync_weights` with the engine's transport "distributed": one sender per PP stage (one
group "eureka-pp{s}" each, the fake as rank 1), the engine's requests from rank 0. Checked, in one
launch per layout: what the fake received equals the HF checkpoint bit for bit, each tensor once
per sync, one group per stage kept between syncs; a refused request, and a broadcast the engine
breaks off (its group gone mid-receive), each fail the sync on every rank alike, leave the engine
at version None with its groups left, and the next sync joins afresh and succeeds.
"""
import pytest
import torch

from eureka_megatron.config import ParallelConfig
from eureka_megatron.models.registry import FAMILIES
from eureka_megatron.runtime.launcher import launch
from tests.unit.fake_sglang_server import FakeSGLangServer

FAMILY = {f.name: f for f in FAMILIES}
BUCKET = 16 << 10  # several buckets per stage, the embedding one of its own


class BreakingServer(FakeSGLangServer):
    """`break_at_bucket`: that update's group is destroyed just before its receive (the
    source's broadcast then has nobody to go to) and the update fails."""

    break_at_bucket = None

    def ep_fake_inject(self, body):
        """Fail (`fail_in`) or break off (`break_in`) the n-th update from now."""
        with self.lock:
            self.fail_at_bucket = self.break_at_bucket = None
            if "fail_in" in body:
                self.fail_at_bucket = self.buckets_seen + body["fail_in"]
            if "break_in" in body:
                self.break_at_bucket = self.buckets_seen + body["break_in"]
        return 200, {"success": True}

    def _receive(self, body):
        if self.buckets_seen - 1 == self.break_at_bucket:
            self._leave(body["group_name"])
            raise RuntimeError("the group was destroyed")
        return super()._receive(body)


def sync_rank(cfg, par, tensors, url, bf16):
    from eureka_megatron.rollout.sglang import SGLangEngine
    from eureka_megatron.rollout.weight_broadcast import WeightBroadcaster, stage_requests
    from eureka_megatron.rollout.weight_export import stage_plan
    from eureka_megatron.rollout.weight_sync import sync_weights
    from eureka_megatron.models.init import fill_global_tensors
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(par)
    fam = FAMILY["qwen2"]
    chunks = fam.build_chunks(cfg, par)
    fill_global_tensors(chunks, lambda key, layer, shape: tensors[(key, layer)])
    if bf16:
        chunks = [c.to(torch.bfloat16) for c in chunks]
    mapping = fam.mapping(cfg, "causal_lm")
    rank0 = torch.distributed.get_rank() == 0
    engine = SGLangEngine.connect(url, weight_transport="distributed") if rank0 else None
    requests = [len(metas) for _, metas in stage_requests(stage_plan(chunks, mapping), BUCKET)]
    broadcaster = WeightBroadcaster()
    out = []

    def sync(version, inject=None):
        if inject and rank0:
            engine.http.post("/fake_inject", inject, timeout=10)
        r = sync_weights(chunks, mapping, engine, version, bucket_bytes=BUCKET,
                         broadcaster=broadcaster)
        out.append({"version": version, "ok": r.ok, "error": r.error, "tensors": r.tensors,
                    "engine_version": engine.weight_version if rank0 else None,
                    "engine_groups": sorted(engine.receiver_info().joined) if rank0 else None,
                    "has_group": broadcaster.group is not None})

    sync(1)
    sync(2)  # the groups are kept
    sync(3, {"fail_in": 1})  # the second request of stage 0 is refused
    sync(4)  # rejoins
    sync(5, {"break_in": sum(requests[:-1]) + 1})  # the last stage's second broadcast breaks off
    sync(6)
    return {"requests": requests, "syncs": out}


def qwen2_case():
    from tests.dist.test_llm_vs_transformers import hf_model, llm_config_of
    from tests.helpers import tiny_config

    hf = hf_model(False)
    return llm_config_of(hf, tiny_config()).model, hf.state_dict()


@pytest.mark.parametrize("tp,pp,bf16", [(1, 2, True), (2, 2, False)], ids=["pp2_bf16", "tp2_pp2"])
def test_broadcast_sync_delivers_the_checkpoint_and_survives_failures(tp, pp, bf16):
    cfg, sd = qwen2_case()
    dtype = torch.bfloat16 if bf16 else torch.float32
    want = {k: v.to(dtype) for k, v in sd.items()}
    tensors = FAMILY["qwen2"].mapping(cfg, "causal_lm").to_megatron(sd.__getitem__)
    server = BreakingServer(join_groups=True).start()
    server.weights = {k: torch.zeros_like(v) for k, v in want.items()}
    try:
        par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp)
        results = launch(sync_rank, par.nproc, cfg, par, tensors, server.url, bf16, timeout=300)
    finally:
        server.stop()
    syncs = [r["syncs"] for r in results]
    for i, expect_ok in enumerate([True, True, False, True, False, True]):
        assert {s[i]["ok"] for s in syncs} == {expect_ok}, [s[i] for s in syncs]  # all agree
        lead = syncs[0][i]
        if expect_ok:
            assert lead["engine_version"] == lead["version"]
            assert lead["engine_groups"] == [f"eureka-pp{s}" for s in range(pp)]
            assert lead["tensors"] == len(want)
        else:
            assert lead["engine_version"] is None and lead["engine_groups"] == []
            assert all(s[i]["error"] for s in syncs)
            assert not any(s[i]["has_group"] for s in syncs)
    assert all("injected" in s[2]["error"] for s in syncs)  # every rank names the cause
    assert "destroyed" in syncs[0][4]["error"] or "Failed to receive" in syncs[0][4]["error"]
    # one join per group, plus the rejoins after each failure
    inits = [c for c in server.calls if c[1] == "/init_weights_update_group"]
    assert sorted(c[2]["group_name"] for c in inits) == sorted(
        f"eureka-pp{s}" for s in range(pp) for _ in range(3))
    assert all(c[2]["world_size"] == 2 and c[2]["rank_offset"] == 1 for c in inits)
    # the last sync: every HF tensor exactly once, bit-exact, version committed with the last
    last = server.received[-sum(results[0]["requests"]):]
    names = [n for bucket in last for n in bucket]
    assert sorted(names) == sorted(want)
    for name, t in want.items():
        assert server.weights[name].dtype == dtype and torch.equal(server.weights[name], t), name
    assert server.weight_version == "6" and not server.session_open and not server.paused
