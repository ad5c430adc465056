"""The RL loop with SGLang engines, colocated: two fake SGLang servers (in this process's threads)
given as `rollout.sglang_url="url1,url2"`, the demo's tiny Qwen2.5-VL trained on one gloo rank;
and disaggregated: one fake that really joins the weight-update groups, the actor at PP2 on two
gloo ranks, `rollout.weight_transport=distributed` (each stage's sender broadcasts its tensors).

The fake generates with its own toy model (the samples are nonsense to the policy, which is fine
here) and takes the synced HF tensors apart from it. Checked: the run drives an EngineGroup of
both servers; each releases its memory before the trainer is built (engines start first) and
resumes it for the initial sync (version 0), then per step: rollout, release of its memory,
resume, and a complete sync carrying that step's version; both hold the same weights.
"""
from pathlib import Path

import pytest
from safetensors.torch import load_file

from eureka_megatron.rollout.buckets import unflatten_bucket

from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint
from eureka_megatron.trainer.loop import run_rl
from tests.unit.fake_sglang_server import FakeSGLangServer, deserialize_payload, tensor_digest


TOKEN_SHIFT = 12  # the fake's tokens 0..15 -> the tiny tokenizer's ordinary tokens (not its specials)


class TinyPolicyServer(FakeSGLangServer):
    """Accepts any HF-named tensors (the tiny policy's) and keeps them apart from its own toy
    generation weights; answers with token ids clear of the tiny tokenizer's special tokens."""

    def __init__(self):
        super().__init__()
        self.synced: dict = {}

    def ep_update_weights_from_tensor(self, body):
        with self.lock:
            if "weights" in self.released:
                return 400, {"success": False, "message": "weights are released"}
            for name, t in unflatten_bucket(deserialize_payload(body["serialized_named_tensors"][0])):
                self.synced[name] = tensor_digest(t)
            if body.get("weight_version") is not None:
                self.weight_version = body["weight_version"]
        return 200, {"success": True, "message": "Success"}

    def ep_generate(self, body):
        status, out = super().ep_generate(body)
        for o in (out if isinstance(out, list) else [out]) if status == 200 else []:
            o["output_ids"] = [t + TOKEN_SHIFT for t in o["output_ids"]]
            o["meta_info"]["output_token_logprobs"] = [
                [lp, t + TOKEN_SHIFT, x] for lp, t, x in o["meta_info"]["output_token_logprobs"]]
        return status, out

    def events(self) -> list[str]:
        """generate (runs collapsed), release, resume, and "sync v" for a sync's last request."""
        out = []
        for _, path, body in self.calls:
            if path == "/generate":
                ev = "generate"
            elif path == "/release_memory_occupation":
                ev = "release"
            elif path == "/resume_memory_occupation":
                ev = "resume"
            elif path == "/update_weights_from_tensor" and body.get("weight_version") is not None:
                ev = f"sync {body['weight_version']}"
            else:
                continue
            if not (ev == "generate" and out and out[-1] == "generate"):
                out.append(ev)
        return out


@pytest.fixture
def servers():
    started = [TinyPolicyServer().start() for _ in range(2)]
    yield started
    for s in started:
        s.stop()


def test_colocated_sglang_group_releases_resumes_and_syncs_each_step(tmp_path, servers):
    hf = write_tiny_checkpoint(tmp_path / "hf", seed=0)
    cfg = demo_config(tmp_path / "run", [
        f"model.hf={hf}", "warmup.steps=0", "train.steps=2", "train.rollout_batch_size=4",
        "rollout.n_samples=2", "rollout.max_new_tokens=4", "algo.online_filter=false",
        "eval.interval=0", "data.synthetic_size=32", "output.progress=false",
        "output.hf_export=false", "rewards.num_workers=1", "rollout.engine=sglang",
        "cluster.colocate=true", f"rollout.sglang_url={servers[0].url},{servers[1].url}"])
    hist = launch(run_rl, 1, cfg, timeout=600)[0]
    assert [h["step"] for h in hist] == [1, 2]
    assert [h["rollout/weight_version"] for h in hist] == [0.0, 1.0]
    assert [h["weight_version"] for h in hist] == [1.0, 2.0]
    want = ["release", "resume", "sync 0", "generate", "release", "resume", "sync 1",
            "generate", "release", "resume", "sync 2"]
    for s in servers:
        assert s.events() == want
        assert s.weight_version == "2" and not s.released
    assert servers[0].synced == servers[1].synced and len(servers[0].synced) > 50


class BroadcastPolicyServer(TinyPolicyServer):
    """The tiny policy's tensors arrive by broadcast, over gloo groups the fake really joins."""

    def __init__(self):
        super().__init__()
        self.join_groups = True

    def load_tensor(self, name, t):
        self.synced[name] = tensor_digest(t)

    def events(self) -> list[str]:
        """generate (runs collapsed) and "sync v" for a sync's last broadcast."""
        out = []
        for _, path, body in self.calls:
            if path == "/generate":
                ev = "generate"
            elif path == "/update_weights_from_distributed" and body.get("weight_version"):
                ev = f"sync {body['weight_version']}"
            else:
                continue
            if not (ev == "generate" and out and out[-1] == "generate"):
                out.append(ev)
        return out


def test_disaggregated_engine_is_synced_by_broadcast_from_each_stage(tmp_path):
    server = BroadcastPolicyServer().start()
    try:
        hf = write_tiny_checkpoint(tmp_path / "hf", seed=0)
        cfg = demo_config(tmp_path / "run", [
            f"model.hf={hf}", "warmup.steps=0", "train.steps=2", "train.rollout_batch_size=4",
            "rollout.n_samples=2", "rollout.max_new_tokens=4", "algo.online_filter=false",
            "eval.interval=0", "data.synthetic_size=32", "output.progress=false",
            "rewards.num_workers=1", "rollout.engine=sglang", "cluster.colocate=false",
            f"rollout.sglang_url={server.url}", "rollout.weight_transport=distributed",
            "rollout.sync_bucket_mb=1", "parallel.pipeline_parallel=2", "parallel.nproc=2"])
        hist = launch(run_rl, 2, cfg, timeout=600)[0]
    finally:
        server.stop()
    assert [h["weight_version"] for h in hist] == [1.0, 2.0]
    assert [h["rollout/weight_version"] for h in hist] == [0.0, 1.0]
    assert server.events() == ["sync 0", "generate", "sync 1", "generate", "sync 2"]
    joined = sorted(c[2]["group_name"] for c in server.calls
                    if c[1] == "/init_weights_update_group")
    assert joined == ["eureka-pp0", "eureka-pp1"]  # once per stage, kept between syncs
    assert not [c for c in server.calls if c[1] == "/update_weights_from_tensor"]
    final = load_file(Path(cfg.output.dir) / "hf_final" / "model.safetensors")
    assert server.synced == {name: tensor_digest(t) for name, t in final.items()}
    assert server.weight_version == "2" and not server.session_open
