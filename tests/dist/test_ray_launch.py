"""Ranks and rollout engines on a real local Ray instance (fake GPUs for placement).

launch_on_ray keeps runtime.launcher.launch's contract (rank order, RankError with the failing
rank's traceback, no hang, everything removed afterwards) and its env vars bring up gloo through
init_distributed; GPU bundles give each rank its own GPU, disaggregated engines other GPUs and
colocated engines the trainer's; RemoteEngine is indistinguishable from a local HFEngine
(samples, streamed weight updates, half-done syncs) and reports a killed actor as dead; an SGLang
engine in an actor receives the trainer's broadcast (the disaggregated transport) and honours the
sync's abort flag.
"""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray")
import ray  # noqa: E402

from eureka_megatron.rollout.bucket_stream import SyncAborted  # noqa: E402
from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket  # noqa: E402
from eureka_megatron.rollout.engine import (BroadcastReceiver, EngineDeadError,  # noqa: E402
                                            GroupJoin, SamplingParams, StaleWeightsError)
from eureka_megatron.rollout.sglang.update_group import WeightUpdateGroup, address_facing  # noqa: E402
from eureka_megatron.runtime.ports import free_port  # noqa: E402
from tests.unit.fake_sglang_server import initial_weights, tensor_digest  # noqa: E402
from eureka_megatron.rollout.hf_engine import HFEngine, WeightSyncError  # noqa: E402
from eureka_megatron.rollout.ray_engine import RemoteEngine, spawn_engine  # noqa: E402
from eureka_megatron.runtime.errors import RankError  # noqa: E402
from eureka_megatron.rollout.ray_engine import place_engines  # noqa: E402
from eureka_megatron.runtime import placement as P  # noqa: E402
from tests import rollout_fixtures as F  # noqa: E402
from tests.dist.ray_helpers import (allreduce_rank, die_on_rank0, fail_on_rank1, sleep_long,  # noqa: E402
                                    where_am_i)

FACTORIES = "tests.dist.ray_helpers"
REPO = Path(__file__).resolve().parents[2]
CPUS, GPUS = 4, 4


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    if ray.is_initialized():  # another module's session: this one needs its own resources
        P.ray_shutdown()
    P.ray_init("local", num_cpus=CPUS, num_gpus=GPUS)  # never a cluster named by RAY_ADDRESS
    yield
    P.ray_shutdown()


def eventually(cond, timeout=20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def wait_all_free():
    """Every CPU and GPU back in the pool: actors killed, placement groups removed."""
    def free():
        res = ray.available_resources()
        return res.get("CPU", 0) == CPUS and res.get("GPU", 0) == GPUS
    return eventually(free)


# --- launch ------------------------------------------------------------------------------------

def test_gloo_ranks_in_order():
    out = P.launch_on_ray(allreduce_rank, 2, 10, env={"EUREKA_TEST": "1"})
    assert [o[0] for o in out] == [0, 1]
    assert [o[1] for o in out] == [21.0, 21.0]  # (0 + 10) + (1 + 10)
    assert [o[2]["LOCAL_RANK"] for o in out] == ["0", "1"]
    assert all(o[2]["WORLD_SIZE"] == "2" and o[2]["LOCAL_WORLD_SIZE"] == "2" for o in out)
    assert all(o[2]["EUREKA_TEST"] == "1" for o in out)
    assert out[0][2]["MASTER_ADDR"] == ray.util.get_node_ip_address()
    assert [o[3] for o in out] == [1, 1]  # one-CPU bundles: one torch thread each
    assert wait_all_free()


def test_failing_rank_raises_at_once_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed") as e:
        P.launch_on_ray(fail_on_rank1, 2)
    assert "bad shard on rank one" in str(e.value) and "in fail_on_rank1" in str(e.value)
    assert time.monotonic() - t0 < 30
    assert wait_all_free()  # the sleeping rank 0 was killed, the placement group removed
    with pytest.raises(RankError, match="rank 0 died"):
        P.launch_on_ray(die_on_rank0, 2)
    assert wait_all_free()
    # (on a very busy box the actors may not even start in time: the same TimeoutError)
    with pytest.raises(TimeoutError, match=r"(ranks \[0, 1\] still running|did not start) .*5s"):
        P.launch_on_ray(sleep_long, 2, timeout=5)
    assert wait_all_free()


def test_unplaceable_layout_names_the_missing_resources():
    layout = P.plan_layout(actor_world=8, engines=0, gpus_per_engine=1, colocate=False, use_gpus=True,
                           cpus_per_bundle=0)
    with pytest.raises(TimeoutError, match=r"needs GPU 8 \(cluster: 4 free of 4\); short of GPU;") as e:
        P.launch_on_ray(where_am_i, 8, layout=layout, timeout=1)
    assert "STRICT_PACK" in str(e.value)
    assert wait_all_free()


def _gpu_layout(colocate):
    return P.plan_layout(actor_world=2, engines=1, gpus_per_engine=2, colocate=colocate,
                         use_gpus=True, gpus_per_node=4)


@pytest.mark.parametrize("colocate", [False, True], ids=["disaggregated", "colocated"])
def test_fake_gpus_ranks_and_engines(colocate):
    layout = _gpu_layout(colocate)
    pg = P.create_placement_group(layout, timeout=30)
    try:
        engines = place_engines(layout, pg, f"{FACTORIES}:ProbeEngine", {"tag": "e0"}, 2)
        ranks = P.launch_on_ray(where_am_i, 2, engines, layout=layout, placement_group=pg, timeout=120)
        rank_gpus = [r["ray_gpus"] for r in ranks]
        assert [len(g) for g in rank_gpus] == [1, 1] and rank_gpus[0] != rank_gpus[1]
        for r in ranks:  # torchrun's view: the node's rank GPUs, device LOCAL_RANK is its own
            assert r["visible"].split(",")[r["local_rank"]] == r["ray_gpus"][0]
            assert r["engines_in_layout"] == 1 and r["has_pg"]
        info = engines[0].node_info()
        assert [r["engine_pids"] for r in ranks] == [[info["pid"]]] * 2  # engines travel to ranks
        engine_gpus = info["cuda_visible_devices"].split(",")
        assert len(engine_gpus) == 2 and info["gpu_ids"][0] == engine_gpus[0]
        trainer = {g[0] for g in rank_gpus}
        if colocate:
            assert set(engine_gpus) == trainer
        else:
            assert trainer.isdisjoint(engine_gpus) and len(trainer | set(engine_gpus)) == 4
        assert engines[0].call("__getattribute__", "cuda_visible_devices") == info["cuda_visible_devices"]
        engines[0].kill()
    finally:
        ray.util.remove_placement_group(pg)
    assert wait_all_free()


# --- RemoteEngine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def local_engine(seed):
    return HFEngine(F.tiny_model("qwen2", seed), F.tiny_tokenizer(), eos_token_ids=[F.EOS])


def buckets_of(model, size=3):
    items = list(model.state_dict().items())
    return [items[i:i + size] for i in range(0, len(items), size)]


def same_samples(a, b):
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    assert [s.weight_version for s in a] == [s.weight_version for s in b]


def test_remote_engine_matches_local_engine(one_thread):
    sp = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=8, seed=7)
    prompts = F.text_prompts()
    remote = spawn_engine(f"{FACTORIES}:tiny_hf_engine", {"seed": 1}, timeout=120)
    try:
        assert isinstance(remote, RemoteEngine) and remote.weight_layout == "causal_lm"
        assert remote.health() and remote.weight_version == 0
        local1 = local_engine(1)
        same_samples(remote.generate(prompts, 2, sp), local1.generate(prompts, 2, sp))

        # stream the seed-0 model's weights: both engines then sample what seed 0 samples
        target = F.tiny_model("qwen2", 0)
        remote.update_weights(iter(buckets_of(target)), 5)
        local1.update_weights(buckets_of(target), 5)
        assert remote.weight_version == 5 and remote.node_info()["last_sync_buckets"] == len(buckets_of(target))
        want = local_engine(0).generate(prompts, 2, sp)
        got = remote.generate(prompts, 2, sp)
        assert [s.token_ids for s in got] == [s.token_ids for s in want]
        same_samples(got, local1.generate(prompts, 2, sp))

        # the trainer's stream breaks after one bucket: the engine serves nothing, like a local one
        def broken():
            yield buckets_of(target)[0]
            raise ConnectionError("export died")
        with pytest.raises(ConnectionError):
            remote.update_weights(broken(), 6)
        assert remote.weight_version is None
        with pytest.raises(StaleWeightsError):
            remote.generate(prompts, 1, sp)
        # a bucket the model cannot take: the engine's own error, same state
        bad = [[("lm_head.weight", torch.zeros(3, 3))]]
        with pytest.raises(WeightSyncError, match="got shape"):
            remote.update_weights(bad, 7)
        assert remote.weight_version is None
        # a missing parameter is caught at the end of the stream
        with pytest.raises(WeightSyncError, match="not written"):
            remote.update_weights(buckets_of(target)[:-1], 7)
        remote.update_weights(buckets_of(target), 8)
        assert remote.weight_version == 8
        assert [s.token_ids for s in remote.generate(prompts, 2, sp)] == [s.token_ids for s in want]

        remote.release_memory()
        assert not remote.health()
        remote.resume_memory()
        assert remote.health()

        # a killed actor: health False, calls raise EngineDeadError (respawn: the next test)
        ray.kill(remote.handle)
        assert eventually(lambda: remote.health() is False)  # ray.kill is asynchronous
        with pytest.raises(EngineDeadError, match="is dead"):
            remote.generate(prompts, 1, sp)
        assert remote.weight_version is None
    finally:
        remote.kill()
    assert wait_all_free()


def test_restart_respawns_a_dead_actor_in_its_place():
    remote = spawn_engine(f"{FACTORIES}:ProbeEngine", {"tag": "x"}, num_cpus=0, timeout=60)
    try:
        pid = remote.node_info()["pid"]
        remote.restart()  # alive: the engine restarts in place
        assert remote.node_info()["pid"] == pid and remote.weight_version is None
        remote.kill()
        assert eventually(lambda: not remote.health())
        remote.restart()  # dead: a new actor, a freshly built engine
        assert remote.health() and remote.weight_version == 0 and remote.node_info()["pid"] != pid
        assert remote.call("__getattribute__", "tag") == "x"
    finally:
        remote.kill()


def test_remote_engine_without_respawn_cannot_restart_a_dead_actor():
    handle = ray.remote(__import__("eureka_megatron.rollout.ray_engine", fromlist=["EngineActor"]).EngineActor) \
        .options(num_cpus=0).remote(f"{FACTORIES}:ProbeEngine", {})
    remote = RemoteEngine(handle, timeout=60)
    remote.restart()  # in place: the engine's own restart
    assert remote.weight_version is None and remote.health()
    ray.kill(handle)
    assert eventually(lambda: not remote.health())
    with pytest.raises(EngineDeadError, match="cannot be respawned"):
        remote.restart()


def test_remote_engine_receives_the_trainers_broadcast():
    """An SGLang engine in an actor (the server a fake process that really joins the group),
    the source here: the actor's engine posts the requests, the bytes come straight from us."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.unit.fake_sglang_server", "--port",
                               str(port), "--join-groups"], cwd=REPO)
    remote = group = None
    try:
        url = f"http://127.0.0.1:{port}"
        assert eventually(lambda: answers(f"{url}/health"), timeout=60)
        remote = spawn_engine("eureka_megatron.rollout.sglang:SGLangEngine.connect",
                              {"url": url, "weight_transport": "distributed"}, num_cpus=0,
                              timeout=120)
        assert remote.weight_transport == "distributed" and isinstance(remote, BroadcastReceiver)
        info = remote.receiver_info()
        assert info.url == f"http://{remote.node_info()['ip']}" and info.ranks == 1
        sent = list(initial_weights(seed=3).items())
        flats = [f for b in bucket_by_bytes(sent, 40) for f in flatten_bucket(b)]
        stages = [("eureka-pp0", [f.metadata for f in flats])]
        address = address_facing(info.url)
        join = GroupJoin((("eureka-pp0", address, free_port(address)),), 2, 1, "gloo")
        abort, errors = threading.Event(), []

        def receive(version, join):
            try:
                remote.receive_weights(stages, version, abort=abort, join=join)
            except Exception as e:  # noqa: BLE001 -- asserted below
                errors.append(e)

        receiver = threading.Thread(target=receive, args=(3, join))
        receiver.start()
        group = WeightUpdateGroup(address, join.groups[0][2], 2, group_name="eureka-pp0",
                                  backend="gloo", timeout=60)
        for f in flats:
            group.broadcast(f.tensor.view(torch.uint8)).wait()
        receiver.join()
        assert not errors and not abort.is_set() and remote.weight_version == 3
        assert remote.call("model_info")["weight_version"] == "3"
        state = json.load(urllib.request.urlopen(f"{url}/fake_state"))
        assert state["weights"] == {n: tensor_digest(t) for n, t in sent}

        abort.set()  # the sync failed elsewhere: the actor's engine sends no request
        receive(4, None)
        assert isinstance(errors[-1], SyncAborted) and remote.weight_version is None
        remote.leave_weight_groups()
        assert remote.receiver_info().joined == frozenset()
    finally:
        if group is not None:  # its name would stay taken in this process's c10d registry
            group.destroy()
        if remote is not None:
            remote.kill()
        server.kill()
        server.wait()


def test_bad_factory_is_reported():
    with pytest.raises(EngineDeadError, match="no_such_factory"):
        spawn_engine(f"{FACTORIES}:no_such_factory", {}, num_cpus=0, timeout=60)
    with pytest.raises(ValueError, match="module:function"):
        from eureka_megatron.rollout.ray_engine import resolve_factory
        resolve_factory("no_colon")
