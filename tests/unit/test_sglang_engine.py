"""SGLangEngine against a fake SGLang server (tests/unit/fake_sglang_server.py), and the buckets.

The fake speaks SGLang 0.5.23's routes and payloads over a tiny torch model, so these tests check
the engine's own logic and its failure handling (a sync that fails or loses the server leaves
version None and generate refusing until a restart and a complete re-sync), with faults the
real server cannot be made to show. That the requests are what SGLang itself accepts is checked
against SGLang's own server app in tests/sglang_api.
"""
import importlib.util
import sys
import threading
from pathlib import Path

import pytest
import torch

from eureka_megatron.rollout import buckets
from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket, unflatten_bucket
from eureka_megatron.rollout.bucket_stream import SyncAborted
from eureka_megatron.rollout.engine import (BroadcastReceiver, EngineDeadError, GroupJoin, Prompt,
                                            ReceiverInfo, RolloutEngine, SamplingParams,
                                            StaleWeightsError)
from eureka_megatron.rollout.sglang import (PromptMismatchError, SGLangEngine, SGLangHTTPError,
                                            SGLangRefused, engine as sglang_engine, flags,
                                            process, server_flags, validate_server_flags)
from eureka_megatron.rollout.sglang.payload import serialize_flat_bucket
from tests.unit.fake_sglang_server import (FakeSGLangServer, deserialize_payload, fake_generate,
                                           initial_weights, tensor_digest)

REPO = Path(__file__).resolve().parents[2]
FAKE_CMD = [sys.executable, "-m", "tests.unit.fake_sglang_server", "--host", "{host}",
            "--port", "{port}"]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_digest(a) == tensor_digest(b)


def new_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    return list(initial_weights(seed).items())


@pytest.fixture
def server():
    s = FakeSGLangServer().start()
    yield s
    s.stop()


@pytest.fixture
def engine(server):
    return SGLangEngine.connect(server.url, health_timeout=2.0)


# --- buckets ----------------------------------------------------------------------------------

def test_bucket_by_bytes_groups_consecutive_tensors():
    t = lambda n: torch.zeros(n, dtype=torch.float32)  # noqa: E731 -- 4 bytes per element
    named = [("a", t(10)), ("b", t(10)), ("c", t(5)), ("big", t(100)), ("d", t(1))]
    buckets = list(bucket_by_bytes(iter(named), 100))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b", "c"], ["big"], ["d"]]
    assert [[n for n, _ in b] for b in bucket_by_bytes(named, 80)] == [["a", "b"], ["c"],
                                                                       ["big"], ["d"]]
    assert list(bucket_by_bytes([], 100)) == []
    with pytest.raises(ValueError):
        list(bucket_by_bytes(named, 0))


def test_flatten_round_trip_is_exact_and_fresh():
    base = torch.randn(6, 8)
    named = [
        ("bf16", torch.randn(3, 5).to(torch.bfloat16)),
        ("fp32", torch.randn(4)),
        ("i64", torch.arange(7, dtype=torch.int64) - 3),
        ("scalar", torch.tensor(1.5)),
        ("transposed", base.t()),                        # non-contiguous
        ("strided", base[::2, 1::3]),                    # non-contiguous, offset storage
        ("i32_0d", torch.tensor(-7, dtype=torch.int32)),
        ("empty", torch.zeros(0, 3)),
        ("bf16_b", torch.full((2, 2), float("nan")).to(torch.bfloat16)),
    ]
    flats = flatten_bucket(named)  # one buffer per dtype, first-appearance order
    assert [f.dtype for f in flats] == [torch.bfloat16, torch.float32, torch.int64, torch.int32]
    assert [f.names for f in flats] == [["bf16", "bf16_b"],
                                        ["fp32", "scalar", "transposed", "strided", "empty"],
                                        ["i64"], ["i32_0d"]]
    out = dict(pair for f in flats for pair in unflatten_bucket(f))
    for name, t in named:
        assert same(out[name], t), name
    again = flatten_bucket(named)
    for f, g in zip(flats, again):
        assert f.tensor.dim() == 1 and f.tensor.is_contiguous()
        assert f.tensor.untyped_storage().data_ptr() != g.tensor.untyped_storage().data_ptr()
        for _, t in named:
            assert f.tensor.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    base.zero_()  # the flat copy does not follow its source
    assert not torch.equal(out["transposed"], base.t())


def test_flat_bucket_payload_is_sglangs_flattened_bucket_shape():
    named = [("w", torch.randn(2, 3)), ("b", torch.randn(3))]
    (flat,) = flatten_bucket(named)
    payload = deserialize_payload(serialize_flat_bucket(flat))
    assert set(payload) == {"flattened_tensor", "metadata"}
    m = payload["metadata"][1]
    assert (m.name, tuple(m.shape), m.dtype, m.start_idx, m.end_idx, m.numel) == \
        ("b", (3,), torch.float32, 6, 9, 3)
    assert all(same(a, t) for (_, a), (_, t) in zip(unflatten_bucket(payload), named))


def test_payload_names_sglangs_metadata_class_and_patches_nothing():
    import pickle
    import pickletools
    from torch.multiprocessing import reductions

    before = (reductions.reduce_tensor, reductions.rebuild_cuda_tensor)
    (flat,) = flatten_bucket([("w", torch.randn(2, 3))])
    raw = __import__("base64").b64decode(serialize_flat_bucket(flat))
    strings = [arg for op, arg, _ in pickletools.genops(raw) if isinstance(arg, str)]
    assert "sglang.srt.weight_sync.tensor_bucket" in strings
    assert "FlattenedTensorMetadata" in strings and "FlatTensorMeta" not in strings
    assert (reductions.reduce_tensor, reductions.rebuild_cuda_tensor) == before
    with pytest.raises((ModuleNotFoundError, AttributeError, pickle.UnpicklingError)):
        if importlib.util.find_spec("sglang") is not None:
            raise ModuleNotFoundError("sglang present: the plain-unpickle check does not apply")
        pickle.loads(raw)  # without sglang its class is not there: it really is SGLang's name


# --- generate ---------------------------------------------------------------------------------

def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 0 and engine.weight_layout == "disk"
    assert engine.tp_size == 1 and engine.deterministic is False and engine.family is None


def test_generate_parses_tokens_logprobs_and_keeps_prompt_order(engine, server):
    prompts = [Prompt(input_ids=[1, 2, 3]), Prompt(input_ids=[4]), Prompt(input_ids=[7, 7])]
    samples = engine.generate(prompts, 2, GREEDY)
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    for s in samples:
        want = fake_generate(server.weights, prompts[s.prompt_index].input_ids,
                             {"temperature": 0.0, "max_new_tokens": 6})
        assert s.token_ids == want["output_ids"] and s.text == want["text"]
        assert s.logprobs == [e[0] for e in want["meta_info"]["output_token_logprobs"]]
        assert len(s.logprobs) == len(s.token_ids) and s.weight_version == 0
        assert s.finish_reason == want["meta_info"]["finish_reason"]["type"]
    (body,) = [b for b in server.generate_bodies if b["input_ids"] == [1, 2, 3]]  # any order
    assert body["return_logprob"] is True
    sp = body["sampling_params"]
    assert sp["n"] == 2 and sp["top_k"] == -1 and sp["max_new_tokens"] == 6
    assert sp["no_stop_trim"] is True and sp["temperature"] == 0.0


def test_generate_stop_conditions_and_seeded_batches(engine, server):
    p = Prompt(input_ids=[1, 2, 3])
    free = engine.generate([p], 1, SamplingParams(temperature=0.0, max_new_tokens=6))[0]
    first = free.token_ids[0]
    stopped = engine.generate([p], 1, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                     stop_token_ids=[first]))[0]
    assert stopped.token_ids == [first] and stopped.finish_reason == "stop"
    if free.text:
        by_str = engine.generate([p], 1, SamplingParams(temperature=0.0, max_new_tokens=6,
                                                        stop=[free.text[0]]))[0]
        assert by_str.finish_reason == "stop" and by_str.text.endswith(free.text[0])
    seeded = SamplingParams(temperature=1.0, max_new_tokens=5, seed=11)
    # a server without --enable-deterministic-inference ignores seeds: none are sent, n is
    engine.generate([p, Prompt(input_ids=[5])], 3, seeded)
    body = next(b for b in server.generate_bodies[::-1] if b["input_ids"] == [5])
    assert body["sampling_params"]["n"] == 3 and "sampling_seed" not in body["sampling_params"]
    server.deterministic = True
    det = SGLangEngine.connect(server.url)
    assert det.deterministic is True
    a = det.generate([p, Prompt(input_ids=[5])], 3, seeded)
    b = det.generate([p, Prompt(input_ids=[5])], 3, seeded)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1]
    bodies = [b for b in server.generate_bodies if b["input_ids"] == [[5]] * 3]
    assert len(bodies) == 2  # requests run in parallel: find prompt 1's by content
    assert [sp["sampling_seed"] for sp in bodies[-1]["sampling_params"]] == [14, 15, 16]


def test_generate_sends_images_as_text_with_one_placeholder_each(server, tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 3), (255, 0, 0))
    path = tmp_path / "x.png"
    img.save(path)
    text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
            "<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>Count.<|im_end|>\n")
    prompt = Prompt(input_ids=list(range(20)), images=[img, path], text=text)
    with pytest.raises(ValueError, match="family"):  # placeholders depend on the family
        SGLangEngine.connect(server.url).generate([prompt], 1, GREEDY)
    engine = SGLangEngine.connect(server.url, family="qwen2_5_vl")
    server.text_prompt_tokens = 20  # SGLang's count after its own expansion: ours
    engine.generate([prompt], 1, GREEDY)
    body = server.generate_bodies[-1]
    one = "<|vision_start|><|image_pad|><|vision_end|>"
    assert "input_ids" not in body and body["text"] == text.replace(
        "<|image_pad|>" * 4, "<|image_pad|>").replace("<|image_pad|>" * 2, "<|image_pad|>")
    assert body["text"].count(one) == 2
    pil_item, path_item = body["image_data"]  # one request: its images, flat
    assert pil_item.startswith("data:image/png;base64,") and path_item == str(path)
    engine.generate([prompt], 2, GREEDY)
    assert len(server.generate_bodies[-1]["image_data"]) == 1  # n > 1: one list per prompt
    server.text_prompt_tokens = 23
    with pytest.raises(PromptMismatchError, match="prompt 0: SGLang counted 23.*have 20"):
        engine.generate([prompt], 1, GREEDY)
    with pytest.raises(ValueError, match="no text"):
        engine.generate([Prompt(input_ids=[1], images=[img])], 1, GREEDY)
    with pytest.raises(ValueError, match="1 image blocks for 2 images"):
        engine.generate([Prompt(input_ids=[1], images=[img, img], text=text[:99])], 1, GREEDY)


# --- colocated weight sync --------------------------------------------------------------------

def test_update_weights_sequence_exact_tensors_and_version(engine, server, monkeypatch):
    flats_made, real = [], buckets.flatten_bucket

    def recording(named):
        flats = real(named)
        flats_made.extend(flats)
        return flats

    monkeypatch.setattr(sglang_engine, "flatten_bucket", recording)
    sent = new_weights(seed=1)
    before = engine.generate([Prompt(input_ids=[2, 3])], 1, GREEDY)[0]
    server.calls.clear()
    engine.update_weights(bucket_by_bytes(iter(sent), 40), version=1)

    paths = server.call_paths()
    uwt = [c for c in server.calls if c[1] == "/update_weights_from_tensor"]
    assert paths[:3] == ["/pause_generation", "/flush_cache", "/begin_weight_update"]
    assert paths[-3:] == ["/end_weight_update", "/model_info", "/continue_generation"]
    assert paths[3:-3] == ["/update_weights_from_tensor"] * len(uwt)
    assert not server.session_open
    assert len(uwt) == len(flats_made) >= 4  # one request per bucket and dtype
    assert [c[2].get("weight_version") for c in uwt] == [None] * (len(uwt) - 1) + ["1"]
    assert all(c[2]["load_format"] == "flattened_bucket" for c in uwt)
    assert [c[2]["flush_cache"] for c in uwt] == [False] * (len(uwt) - 1) + [True]
    for name, t in sent:
        assert same(server.weights[name], t), name
    ptrs = [f.tensor.untyped_storage().data_ptr() for f in flats_made]
    assert len(set(ptrs)) == len(ptrs)  # a fresh buffer per bucket and dtype
    assert not set(ptrs) & {t.untyped_storage().data_ptr() for _, t in sent}
    assert engine.weight_version == 1 and engine.get_server_weight_version() == "1"
    after = engine.generate([Prompt(input_ids=[2, 3])], 1, GREEDY)[0]
    assert after.weight_version == 1
    want = fake_generate(dict(sent), [2, 3], {"temperature": 0.0, "max_new_tokens": 6})
    assert after.token_ids == want["output_ids"] and after.token_ids != before.token_ids


def test_update_weights_replicates_payload_per_tp_rank(server):
    server.tp_size = 2
    engine = SGLangEngine.connect(server.url)
    assert engine.tp_size == 2
    engine.update_weights([new_weights(seed=2)], version=5)
    assert set(server.rank_payloads) == {2}


def test_failed_sync_leaves_version_none_until_a_full_resync(engine, server):
    server.fail_at_bucket = 1
    with pytest.raises(SGLangRefused, match="injected"):
        engine.update_weights(bucket_by_bytes(new_weights(seed=4), 40), version=2)
    assert engine.weight_version is None
    assert server.paused  # half-updated weights are not served
    assert not server.session_open  # closed, so the next sync can open one
    with pytest.raises(StaleWeightsError):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    assert engine.health()  # paused by our sync: alive (its state answers), not dead
    assert server.call_paths()[-1] == "/server_info"
    with pytest.raises(ValueError):
        engine.update_weights([], version=2)
    sent = new_weights(seed=4)
    engine.update_weights(bucket_by_bytes(sent, 40), version=2)
    assert engine.weight_version == 2 and not server.paused and engine.health()
    assert all(same(server.weights[n], t) for n, t in sent)
    assert engine.generate([Prompt(input_ids=[1])], 1, GREEDY)[0].weight_version == 2


def test_server_death_mid_sync_is_engine_dead(engine, server):
    server.die_at_bucket = 1
    with pytest.raises(EngineDeadError, match=server.url):
        engine.update_weights(bucket_by_bytes(new_weights(seed=5), 40), version=3)
    assert engine.weight_version is None and not engine.health()
    with pytest.raises(StaleWeightsError):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    with pytest.raises(EngineDeadError):  # a connected server cannot be restarted from here
        engine.restart()


def test_session_left_open_by_a_dead_client_is_closed_and_reopened(engine, server):
    server.session_open = True  # another process died inside a sync
    sent = new_weights(seed=8)
    engine.update_weights([sent], version=3)
    assert engine.weight_version == 3 and not server.session_open
    begins = [i for i, p in enumerate(server.call_paths()) if p == "/begin_weight_update"]
    assert len(begins) == 2 and server.call_paths()[begins[0] + 1] == "/end_weight_update"


def test_restart_of_a_connected_server_keeps_it_and_closes_the_session(engine, server):
    server.fail_at_bucket = 0
    server.session_open = False
    with pytest.raises(SGLangRefused):
        engine.update_weights([new_weights(seed=9)], version=4)
    server.session_open = True  # as if our end_weight_update had been lost
    engine.restart()
    assert engine.weight_version is None and not server.session_open
    engine.update_weights([new_weights(seed=9)], version=4)
    assert engine.generate([Prompt(input_ids=[1])], 1, GREEDY)[0].weight_version == 4


def test_server_version_mismatch_refuses_samples(engine, server):
    server.weight_version = "9"  # someone else changed the weights behind our back
    with pytest.raises(StaleWeightsError, match="'9'"):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)


def test_release_and_resume_memory(engine, server):
    engine.release_memory(["kv_cache"])
    assert server.released == {"kv_cache"} and engine.weight_version == 0
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    engine.resume_memory(["kv_cache"])
    engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    engine.release_memory()  # everything: the weights are gone
    assert server.released == {"weights", "kv_cache", "cuda_graph"}
    assert engine.weight_version is None
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.update_weights([new_weights(seed=6)], version=4)
    engine.resume_memory()
    assert not server.released
    engine.update_weights([new_weights(seed=6)], version=4)
    assert engine.generate([Prompt(input_ids=[1])], 1, GREEDY)[0].weight_version == 4
    tags = [c[2]["tags"] for c in server.calls if "memory_occupation" in c[1]]
    everything = ["weights", "kv_cache", "cuda_graph"]
    assert tags == [["kv_cache"], ["kv_cache"], everything, everything]
    engine.release_memory(["kv_cache", "cuda_graph"])
    engine.resume_memory()  # names just what was released (SGLang: KeyError on the rest)
    assert server.calls[-1][2]["tags"] == ["kv_cache", "cuda_graph"] and not server.released
    calls = len(server.calls)
    engine.resume_memory()  # nothing released: nothing sent
    assert len(server.calls) == calls


def test_distributed_control_bodies(engine, server):
    engine.init_weight_update_group("10.0.0.1", 29600, rank_offset=1, world_size=3,
                                    group_name="g")
    with pytest.raises(SGLangRefused, match="must run between begin_weight_update"):
        engine.update_weights_from_distributed(["a"], ["float32"], [[1]], group_name="g")
    engine.begin_weight_update()
    engine.update_weights_from_distributed(["a.weight"], [torch.bfloat16], [torch.Size([2, 3])],
                                           group_name="g")
    engine.update_weights_from_distributed(["b.weight"], ["float32"], [[4]], group_name="g",
                                           version=8)
    engine.end_weight_update()
    assert server.weight_version == "8"
    init, _, first, last = [c[2] for c in server.calls
                            if "group" in c[1] or "distributed" in c[1]]
    assert init == {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1,
                    "world_size": 3, "group_name": "g", "backend": "nccl"}
    assert first == {"names": ["a.weight"], "dtypes": ["bfloat16"], "shapes": [[2, 3]],
                     "group_name": "g", "flush_cache": False, "load_format": "flattened_bucket"}
    assert last["weight_version"] == "8" and last["dtypes"] == ["float32"]
    engine.destroy_weight_update_group("g")
    engine.begin_weight_update()
    with pytest.raises(SGLangRefused, match="not found"):
        engine.update_weights_from_distributed(["a"], ["float32"], [[1]], group_name="g")


def test_receive_weights_is_one_session_over_every_group_version_last(engine, server):
    engine.weight_transport = "distributed"
    assert isinstance(engine, BroadcastReceiver)
    metas = [flat.metadata for b in bucket_by_bytes(new_weights(seed=1), 40)
             for flat in flatten_bucket(b)]
    stages = [("eureka-pp0", metas[:2]), ("eureka-pp1", metas[2:])]
    join = GroupJoin((("eureka-pp0", "10.0.0.1", 29600), ("eureka-pp1", "10.0.0.2", 29601)),
                     world_size=3, rank_offset=1, backend="gloo")
    abort = threading.Event()
    engine.receive_weights(stages, 4, abort=abort, join=join)
    assert engine.weight_version == 4 and server.weight_version == "4" and not abort.is_set()
    assert engine.receiver_info() == ReceiverInfo(server.url, 1, "gloo", 600.0,
                                                  frozenset({"eureka-pp0", "eureka-pp1"}))
    calls = [(path, body) for _, path, body in server.calls if "weight" in path]
    assert [p for p, _ in calls] == (["/init_weights_update_group"] * 2 + ["/begin_weight_update"]
                                     + ["/update_weights_from_distributed"] * len(metas)
                                     + ["/end_weight_update"])
    assert [b["master_address"] for p, b in calls[:2]] == ["10.0.0.1", "10.0.0.2"]
    updates = [b for p, b in calls if p == "/update_weights_from_distributed"]
    assert [u["group_name"] for u in updates] == ["eureka-pp0"] * 2 + ["eureka-pp1"] * (
        len(metas) - 2)
    assert [u.get("weight_version") for u in updates] == [None] * (len(metas) - 1) + ["4"]
    assert sorted(n for u in updates for n in u["names"]) == sorted(initial_weights(1))

    server.fail_at_bucket = server.buckets_seen + 1  # the second request is refused
    with pytest.raises(SGLangRefused, match="injected"):
        engine.receive_weights(stages, 5, abort=abort)
    assert abort.is_set() and engine.weight_version is None and not server.session_open
    abort.clear()
    seen = server.buckets_seen
    abort.set()  # a source failed: not one more request
    with pytest.raises(SyncAborted):
        engine.receive_weights(stages, 5, abort=abort)
    assert server.buckets_seen == seen and engine.weight_version is None
    engine.leave_weight_groups()
    assert server.groups == set() and engine.receiver_info().joined == frozenset()


def test_http_errors_and_dead_urls():
    s = FakeSGLangServer().start()
    engine = SGLangEngine.connect(s.url)
    with pytest.raises(SGLangHTTPError, match="HTTP 404.*Not Found"):
        engine.http.post("/no_such_endpoint", {}, timeout=5)
    s.stop()
    assert not engine.health()
    with pytest.raises(EngineDeadError, match=s.url):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    with pytest.raises(EngineDeadError, match=s.url):
        SGLangEngine.connect(s.url)


# --- launch / restart (real processes) --------------------------------------------------------

def _launch(*extra, **kw):
    return SGLangEngine.launch("unused-model", command=FAKE_CMD + list(extra),
                               env={"PYTHONPATH": str(REPO)},
                               startup_timeout=kw.pop("startup_timeout", 60), **kw)


def _state(engine):
    return engine.http.get("/fake/state", timeout=10)


def test_launch_restart_and_resync():
    engine = _launch("--die-at-bucket", "3")
    try:
        assert engine.health() and engine.weight_version == 0
        pid = _state(engine)["pid"]
        engine.generate([Prompt(input_ids=[3])], 2, GREEDY)
        with pytest.raises(EngineDeadError):  # the process exits on its 4th tensor update
            engine.update_weights(bucket_by_bytes(new_weights(seed=7), 40), version=1)
        assert engine.weight_version is None and not engine.health()
        engine.restart()
        assert engine.weight_version is None and _state(engine)["pid"] != pid
        with pytest.raises(StaleWeightsError):
            engine.generate([Prompt(input_ids=[3])], 1, GREEDY)
        sent = new_weights(seed=7)
        engine.update_weights([sent], version=1)  # one bucket, 3 dtypes: before the death
        state = _state(engine)
        assert state["weight_version"] == "1" and engine.weight_version == 1
        assert state["weights"] == {n: tensor_digest(t) for n, t in sent}
        got = engine.generate([Prompt(input_ids=[3])], 1, GREEDY)[0]
        assert got.token_ids == fake_generate(dict(sent), [3], {"temperature": 0.0,
                                                               "max_new_tokens": 6})["output_ids"]
    finally:
        proc = engine.process._popen
        engine.shutdown()
    assert proc.poll() is not None


def test_launch_reports_early_exit_with_log_tail(tmp_path):
    with pytest.raises(EngineDeadError, match="(?s)exited with code 3.*FAKE FATAL: no GPU"):
        _launch("--fail-on-start", "FAKE FATAL: no GPU", log_path=str(tmp_path / "s.log"))


def test_launch_with_a_flag_the_server_refuses_names_it(tmp_path):
    with pytest.raises(EngineDeadError, match=r"exited with code 2 before it was healthy "
                       r"\(.*error: unrecognized arguments: --no-such-flag\)"):
        _launch("--no-such-flag", log_path=str(tmp_path / "s.log"))


def test_launch_times_out_and_kills_the_server(tmp_path, monkeypatch):
    procs = []
    real_popen = process.subprocess.Popen
    monkeypatch.setattr(process.subprocess, "Popen",
                        lambda *a, **k: procs.append(real_popen(*a, **k)) or procs[-1])
    log = tmp_path / "s.log"
    with pytest.raises(EngineDeadError, match=f"not healthy within 2s.*--startup-delay.*{log}"):
        _launch("--startup-delay", "60", startup_timeout=2, log_path=str(log))
    assert procs[0].poll() is not None  # killed, not left behind


def test_server_flags():
    argv = server_flags("/models/qwen", tp=2, mem_fraction_static=0.6, host="127.0.0.1",
                         port=31000, weight_version=0, extra_args=["--enable-memory-saver"])
    assert argv == ["--model-path", "/models/qwen", "--tp-size", "2", "--host", "127.0.0.1",
                     "--port", "31000", "--mem-fraction-static", "0.6", "--weight-version",
                     "0", "--enable-memory-saver"]
    det = server_flags("/m", deterministic=True)
    assert det.count("--enable-deterministic-inference") == 1
    assert server_flags("/m", deterministic=True, extra_args=[
        "--enable-deterministic-inference"]).count("--enable-deterministic-inference") == 1
    if not flags.sglang_available():
        validate_server_flags(["--no-such-flag"])  # nothing to validate against here


def test_launch_reads_the_family_and_deterministic_mode(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text('{"model_type": "internvl_chat"}')
    started = []
    monkeypatch.setattr(SGLangEngine, "_start", lambda self: started.append(self))
    e = SGLangEngine.launch(str(tmp_path), deterministic=True, command=["true"])
    assert e.family == "internvl" and e.deterministic and started == [e]
    assert sglang_engine.family_of_checkpoint(tmp_path / "missing") is None
