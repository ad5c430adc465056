"""EngineGroup over several fake SGLang servers (tests/unit/fake_sglang_server.py, in-process
threads; real processes for restart), and the SGLang engine construction of the RL run.

- generate on 2 or 3 engines (servers in deterministic-inference mode, which honour seeds) gives
  exactly one engine's samples (order, prompt indices, seeded
  tokens and log-probs): each slice samples with the seeds one engine would use.
- update_weights reads the bucket stream once, holds about one bucket at a time, and loads every
  bucket into every server under the same version; a failing engine is named and the others
  still get the whole stream.
- receive_weights (the broadcast transport): every engine joins each group, its ranks after the
  previous engines', and receives every broadcast; a refusal anywhere raises the sync's abort.
- release / resume / health fan out; a dead server's errors name its index; restart replaces
  only the dead engine.
"""
import gc
import os
import signal
import sys
import threading
import weakref

import pytest
import torch

from eureka_megatron.config import ConfigError
from eureka_megatron.config import load_rl_config
from eureka_megatron.rollout import factory as engine_factory
from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket
from eureka_megatron.rollout.engine import (BroadcastReceiver, EngineDeadError, GroupJoin, Prompt,
                                            RolloutEngine, SamplingParams, StaleWeightsError)
from eureka_megatron.rollout.engine_group import EngineGroup, _slices
from eureka_megatron.rollout.sglang import SGLangEngine
from eureka_megatron.trainer import engines as run_engines
from tests.unit.fake_sglang_server import FakeSGLangServer, initial_weights, tensor_digest

FAKE_CMD = [sys.executable, "-m", "tests.unit.fake_sglang_server", "--host", "{host}",
            "--port", "{port}"]
SEEDED = SamplingParams(temperature=1.0, max_new_tokens=5, seed=1234)
PROMPTS = [Prompt(input_ids=[i % 7, (3 * i) % 11, i % 5]) for i in range(7)]


def connect(server):
    return SGLangEngine.connect(server.url, health_timeout=2.0)


@pytest.fixture
def servers():
    started = [FakeSGLangServer().start() for _ in range(4)]  # 3 for the group, 1 alone
    for s in started:
        s.deterministic = True  # --enable-deterministic-inference: seeds are honoured
    yield started
    for s in started:
        try:
            s.stop()
        except OSError:
            pass


@pytest.fixture
def group(servers):
    return EngineGroup([connect(s) for s in servers[:3]])


def digests(server):
    return {n: tensor_digest(t) for n, t in server.weights.items()}


def test_slices_are_contiguous_and_near_equal():
    assert _slices(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert _slices(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert _slices(0, 2) == [(0, 0), (0, 0)]


@pytest.mark.parametrize("k,n,sampling", [(3, 3, SEEDED), (2, 1, SEEDED),
                                          (3, 2, SamplingParams(temperature=0.0, max_new_tokens=4))])
def test_generate_equals_one_engine(servers, k, n, sampling):
    alone = connect(servers[3]).generate(PROMPTS, n, sampling)
    grp = EngineGroup([connect(s) for s in servers[:k]])
    assert isinstance(grp, RolloutEngine)
    got = grp.generate(PROMPTS, n, sampling)
    assert [s.prompt_index for s in got] == [i for i in range(len(PROMPTS)) for _ in range(n)]
    assert [(s.prompt_index, s.token_ids, s.logprobs, s.text, s.finish_reason) for s in got] == \
        [(s.prompt_index, s.token_ids, s.logprobs, s.text, s.finish_reason) for s in alone]
    assert all(s.generate_bodies for s in servers[:k])  # every engine served its slice
    again = grp.generate(PROMPTS, n, sampling)  # deterministic
    assert [s.token_ids for s in again] == [s.token_ids for s in got]
    if sampling.seed is not None:  # a different seed samples differently
        other = grp.generate(PROMPTS, n, SamplingParams(temperature=1.0, max_new_tokens=5, seed=7))
        assert [s.token_ids for s in other] != [s.token_ids for s in got]


def test_generate_with_fewer_prompts_than_engines(group, servers):
    got = group.generate(PROMPTS[:2], 2, SEEDED)
    assert [s.prompt_index for s in got] == [0, 0, 1, 1]
    assert not servers[2].generate_bodies  # the third engine had nothing to do
    assert group.generate([], 2, SEEDED) == []


class Tracked(list):
    """A bucket that can be weak-referenced (to see when the group lets go of it)."""


def test_update_weights_every_bucket_to_every_engine_once(group, servers):
    sent = list(initial_weights(seed=1).items())
    alive, reads = [], []

    def source():
        for i, b in enumerate(bucket_by_bytes(iter(sent), 16)):
            gc.collect()
            # when bucket i is read, bucket i-2 and older are gone everywhere
            assert sum(r() is not None for r in alive[:max(0, i - 1)]) == 0, i
            reads.append(i)
            bucket = Tracked(b)
            alive.append(weakref.ref(bucket))
            yield bucket

    before = [digests(s) for s in servers[:3]]
    group.update_weights(source(), version=1)
    assert len(reads) >= 4 and reads == list(range(len(reads)))  # the stream read once
    want = {n: tensor_digest(t) for n, t in sent}
    for s, old in zip(servers[:3], before):
        assert digests(s) == want != old
        assert s.weight_version == "1"
        assert [p for p in s.call_paths() if p == "/update_weights_from_tensor"] == \
            ["/update_weights_from_tensor"] * s.buckets_seen
    assert len({s.buckets_seen for s in servers[:3]}) == 1
    assert group.weight_version == 1
    assert all(s.weight_version == 1 for s in group.generate(PROMPTS, 1, SEEDED))


def test_a_failing_engine_is_named_and_the_others_get_everything(group, servers):
    servers[1].fail_at_bucket = 1
    sent = list(initial_weights(seed=2).items())
    with pytest.raises(RuntimeError, match=r"engine 1 of 3 \(http://.*injected") as e:
        group.update_weights(bucket_by_bytes(sent, 40), version=2)
    assert "engines [" not in str(e.value)
    assert [eng.weight_version for eng in group.engines] == [2, None, 2]
    assert group.weight_version is None
    with pytest.raises(StaleWeightsError, match="engine 1 of 3"):
        group.generate(PROMPTS, 1, SEEDED)
    want = {n: tensor_digest(t) for n, t in sent}
    assert digests(servers[0]) == digests(servers[2]) == want
    servers[1].fail_at_bucket = None
    group.update_weights(bucket_by_bytes(sent, 40), version=2)  # a full resync repairs it
    assert group.weight_version == 2 and digests(servers[1]) == want


def test_a_failing_bucket_stream_aborts_every_engine(group, servers):
    def broken():
        yield list(initial_weights(seed=3).items())[:2]
        raise OSError("export failed")

    with pytest.raises(OSError, match="export failed"):
        group.update_weights(broken(), version=4)
    assert [e.weight_version for e in group.engines] == [None, None, None]


def test_receive_weights_joins_every_engine_after_the_others(group, servers):
    for e in group.engines:
        e.weight_transport = "distributed"
    group = EngineGroup(group.engines)
    assert group.weight_transport == "distributed" and isinstance(group, BroadcastReceiver)
    assert group.receiver_info().ranks == 3
    metas = [f.metadata for b in bucket_by_bytes(list(initial_weights(seed=2).items()), 40)
             for f in flatten_bucket(b)]
    join = GroupJoin((("eureka-pp0", "10.0.0.1", 29600),), world_size=4, rank_offset=1,
                     backend="gloo")
    abort = threading.Event()
    group.receive_weights([("eureka-pp0", metas)], 3, abort=abort, join=join)
    inits = [[b for _, p, b in s.calls if p == "/init_weights_update_group"] for s in servers[:3]]
    assert [[(b["rank_offset"], b["world_size"]) for b in i] for i in inits] == [
        [(1, 4)], [(2, 4)], [(3, 4)]]
    assert group.weight_version == 3 and group.receiver_info().joined == {"eureka-pp0"}
    servers[1].fail_at_bucket = servers[1].buckets_seen  # engine 1 refuses its first update
    with pytest.raises(RuntimeError, match=r"engine 1 of 3.*injected"):
        group.receive_weights([("eureka-pp0", metas)], 4, abort=abort)
    assert abort.is_set() and group.weight_version is None
    group.leave_weight_groups()
    assert group.receiver_info().joined == frozenset() and not any(s.groups for s in servers)
    with pytest.raises(ValueError, match="weight transport"):
        EngineGroup([group.engines[0], connect(servers[3])])


def test_weight_version_is_the_lowest(group):
    group.engines[2]._version = 0
    group.engines[0]._version = 3
    group.engines[1]._version = 2
    assert group.weight_version == 0
    group.engines[1]._version = None
    assert group.weight_version is None


def test_release_and_resume_fan_out(group, servers):
    assert group.health()
    group.release_memory()
    assert all(s.released == {"weights", "kv_cache", "cuda_graph"} for s in servers[:3])
    assert not group.health() and group.healths() == [False] * 3
    assert group.weight_version is None  # weights released without a CPU backup
    with pytest.raises(RuntimeError, match="engine 0 of 3"):
        group.generate(PROMPTS, 1, SEEDED)
    group.resume_memory()
    assert all(not s.released for s in servers[:3])
    order = [[p for p in s.call_paths() if "memory" in p] for s in servers[:3]]
    assert order == [["/release_memory_occupation", "/resume_memory_occupation"]] * 3
    group.update_weights([list(initial_weights(seed=5).items())], version=5)
    assert group.health() and group.weight_version == 5


def test_a_dead_server_is_named(group, servers):
    servers[2].stop()
    with pytest.raises(EngineDeadError, match=rf"engine 2 of 3 \({servers[2].url}\)"):
        group.generate(PROMPTS, 1, SEEDED)
    assert group.healths() == [True, True, False] and not group.health()
    with pytest.raises(EngineDeadError, match="engine 2 of 3"):
        group.update_weights([list(initial_weights(seed=6).items())], version=6)
    assert [e.weight_version for e in group.engines] == [6, 6, None]
    with pytest.raises(EngineDeadError, match="engine 2 of 3"):
        group.release_memory()
    assert servers[0].released and servers[1].released  # the others did release


def test_layouts_must_agree(servers):
    a, b = connect(servers[0]), connect(servers[1])
    b.weight_layout = "chat"
    with pytest.raises(ValueError, match="engine 1 of 2.*'chat'"):
        EngineGroup([a, b])
    with pytest.raises(ValueError):
        EngineGroup([])


def test_one_engine_is_that_engine(servers):
    engine = connect(servers[0])
    grp = EngineGroup([engine])
    assert grp.generate(PROMPTS, 2, SEEDED) == engine.generate(PROMPTS, 2, SEEDED)
    servers[0].stop()
    with pytest.raises(EngineDeadError) as e:
        grp.generate(PROMPTS, 1, SEEDED)
    assert "engine 0" not in str(e.value)  # the engine's own error, untouched
    with pytest.raises(EngineDeadError):  # a connected server that is gone cannot be kept
        grp.restart()  # restarted unconditionally, as the engine itself would be


def _pid(engine):
    return engine.http.get("/fake_state", timeout=5)["pid"]


def test_restart_replaces_only_the_dead_engine():
    engines = engine_factory.launch_local_engines(
        dict(model_path="unused", command=FAKE_CMD,
             health_timeout=2.0, startup_timeout=60), [["0"], ["1"]])
    grp = EngineGroup(engines)
    try:
        assert [e.process.env for e in engines] == [{"CUDA_VISIBLE_DEVICES": "0"},
                                            {"CUDA_VISIBLE_DEVICES": "1"}]
        pids = [_pid(e) for e in engines]
        os.killpg(engines[1].process._popen.pid, signal.SIGKILL)
        engines[1].process._popen.wait(10)
        assert grp.healths() == [True, False]
        grp.restart()
        assert grp.health() and _pid(engines[0]) == pids[0] and _pid(engines[1]) != pids[1]
        assert [e.weight_version for e in engines] == [0, None]
        grp.update_weights([list(initial_weights(seed=7).items())], version=1)
        assert grp.weight_version == 1
        pids = [_pid(e) for e in engines]
        grp.restart()  # all healthy: every engine is restarted
        assert all(_pid(e) != p for e, p in zip(engines, pids)) and grp.health()
    finally:
        grp.shutdown()


# --- the RL run's engines -------------------------------------------------------------------

def test_comma_separated_urls_make_a_group(servers, tmp_path):
    cfg = load_rl_config(None, ["model.hf=ckpt", "rollout.engine=sglang",
                                f"rollout.sglang_url={servers[0].url}, {servers[1].url}"])
    grp = run_engines.build_engine(cfg, tmp_path)
    assert isinstance(grp, EngineGroup) and [e.url for e in grp.engines] == [s.url for s in servers[:2]]
    cfg.rollout.sglang_url = servers[2].url
    assert isinstance(run_engines.build_engine(cfg, tmp_path), SGLangEngine)


def test_under_the_ray_launcher_engines_are_placed_in_its_group(servers, tmp_path, monkeypatch):
    from eureka_megatron.rollout import ray_engine
    from eureka_megatron.runtime import placement

    layout = placement.plan_layout(actor_world=4, engines=2, gpus_per_engine=2, colocate=True,
                                   use_gpus=False)
    placed = []

    def place(lay, pg, factory, kwargs, gpus, timeout):
        placed.append((lay, pg, factory, kwargs, gpus))
        return [connect(s) for s in servers[:2]]

    monkeypatch.setattr(placement, "current_placement", lambda: (layout, "the-pg"))
    monkeypatch.setattr(ray_engine, "place_engines", place)
    cfg = load_rl_config(None, ["model.hf=ckpt", "rollout.engine=sglang", "parallel.nproc=4",
                                "rollout.engines=2", "rollout.gpus_per_engine=2",
                                "rollout.mem_fraction_static=0.5"])
    grp = run_engines.build_engine(cfg, tmp_path)
    assert isinstance(grp, EngineGroup) and len(grp) == 2
    ((lay, pg, factory, kwargs, gpus),) = placed
    assert (lay, pg, factory, gpus) == (layout, "the-pg", engine_factory.SGLANG_FACTORY, 2)
    assert kwargs["mem_fraction_static"] == 0.5 and kwargs["tp"] == 2
    assert kwargs["weight_transport"] == "tensor"  # auto, here: through Ray to the actor
    from eureka_megatron.rollout.ray_engine import resolve_factory

    assert resolve_factory(factory) == SGLangEngine.launch
    cfg.rollout.weight_transport = "distributed"  # the trainer's senders broadcast to them
    run_engines.build_engine(cfg, tmp_path)
    assert placed[-1][3]["weight_transport"] == "distributed"


def test_local_engine_gpus_and_launch_arguments(tmp_path):
    def cfg(*extra):
        return load_rl_config(None, ["model.hf=ckpt", "rollout.engine=sglang", *extra])

    gpus = [str(i) for i in range(8)]
    c = cfg("parallel.nproc=8", "rollout.engines=4", "rollout.gpus_per_engine=2")
    assert run_engines.local_engine_gpus(c, gpus) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    c = cfg("parallel.nproc=4", "rollout.engines=2", "rollout.gpus_per_engine=2",
            "cluster.colocate=false")
    assert run_engines.local_engine_gpus(c, list("46213570")) == [["3", "5"], ["7", "0"]]
    with pytest.raises(ValueError, match="need GPUs 4..9, but 8 are visible"):
        run_engines.local_engine_gpus(cfg("parallel.nproc=4", "rollout.engines=3",
                                          "rollout.gpus_per_engine=2", "cluster.colocate=false"), gpus)
    c = cfg("rollout.mem_fraction_static=0.42", "rollout.gpus_per_engine=2")
    kw = run_engines.launch_kwargs(c, tmp_path)
    assert kw == dict(model_path=str(tmp_path), tp=2, mem_fraction_static=0.42,
                      deterministic=False, weight_transport="tensor",
                      extra_args=["--enable-memory-saver"])  # colocated: release needs it
    apart = run_engines.launch_kwargs(cfg("cluster.colocate=false"), tmp_path)
    assert apart["extra_args"] == []
    # engines on GPUs of their own get a broadcast group; without CUDA there is none to use
    assert apart["weight_transport"] == ("distributed" if torch.cuda.is_available() else "tensor")
    assert run_engines.launch_kwargs(cfg("rollout.weight_transport=distributed",
                                         "rollout.deterministic=true"), tmp_path) | {
        "extra_args": None} == kw | dict(tp=1, mem_fraction_static=None, deterministic=True,
                                         weight_transport="distributed", extra_args=None)
    assert cfg().rollout.mem_fraction_static is None
    with pytest.raises(ConfigError, match="weight_transport='nccl' is not one of auto"):
        cfg("rollout.weight_transport=nccl")


def test_deterministic_run_refuses_servers_that_ignore_seeds(servers):
    servers[1].deterministic = False
    c = load_rl_config(None, ["model.hf=ckpt", "rollout.engine=sglang", "rollout.deterministic=true"])
    urls = f"{servers[0].url},{servers[1].url}"
    deterministic = c.rollout.deterministic
    with pytest.raises(ValueError, match=f"{servers[1].url}.*without --enable-deterministic"):
        engine_factory.connect_engines(urls, deterministic=deterministic)
    assert len(engine_factory.connect_engines(servers[0].url, deterministic=deterministic)) == 1


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "true"])
def test_mem_fraction_static_is_validated(value):
    with pytest.raises(ConfigError, match="mem_fraction_static"):
        load_rl_config(None, ["model.hf=ckpt", f"rollout.mem_fraction_static={value}"])


def test_colocated_sglang_frees_memory_between_rollout_and_sync():
    from eureka_megatron.trainer.rollout_service import frees_engine_memory

    def cfg(*extra):
        return load_rl_config(None, ["model.hf=ckpt", *extra])

    assert frees_engine_memory(cfg("rollout.engine=sglang"))
    assert not frees_engine_memory(cfg("rollout.engine=sglang", "cluster.colocate=false"))
    assert not frees_engine_memory(cfg())  # the in-process HF engine keeps its memory
