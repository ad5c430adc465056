"""SGLangEngine against a fake SGLang server (tests/unit/fake_sglang_server.py), and the buckets.

The fake speaks SGLang's payloads over a tiny torch model, so these tests check what crosses the
wire (request shapes, call order, bit-exact tensors, versions) and the engine's failure handling:
a sync that fails or loses the server leaves version None and generate refusing until a restart
and a complete re-sync.
"""
import sys
from pathlib import Path

import pytest
import torch

from eureka_megatron.rollout import sglang_engine
from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket, unflatten_bucket
from eureka_megatron.rollout.engine import (EngineDeadError, Prompt, RolloutEngine,
                                            SamplingParams, StaleWeightsError)
from eureka_megatron.rollout.sglang_engine import (SGLangEngine, SGLangHTTPError,
                                                   deserialize_payload, serialize_payload,
                                                   server_flags)
from tests.unit.fake_sglang_server import (FakeSGLangServer, fake_generate, initial_weights,
                                           tensor_digest)

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
    return SGLangEngine.connect(server.url, use_sglang_serializer=False, health_timeout=2.0)


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
    payload = flat.payload()
    assert set(payload) == {"flattened_tensor", "metadata"}
    m = payload["metadata"][1]
    assert (m.name, tuple(m.shape), m.dtype, m.start_idx, m.end_idx, m.numel) == \
        ("b", (3,), torch.float32, 6, 9, 3)
    assert m.offset == 6
    back = unflatten_bucket(deserialize_payload(serialize_payload(payload, use_sglang=False)))
    assert all(same(a, t) for (_, a), (_, t) in zip(back, named))


# --- generate ---------------------------------------------------------------------------------

def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)
    assert engine.weight_version == 0 and engine.weight_layout == "disk"


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
    a = engine.generate([p, Prompt(input_ids=[5])], 3, seeded)
    b = engine.generate([p, Prompt(input_ids=[5])], 3, seeded)
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.prompt_index for s in a] == [0, 0, 0, 1, 1, 1]
    bodies = [b for b in server.generate_bodies if b["input_ids"] == [[5]] * 3]
    assert len(bodies) == 2  # requests run in parallel: find prompt 1's by content
    assert [sp["sampling_seed"] for sp in bodies[-1]["sampling_params"]] == [14, 15, 16]


def test_generate_sends_images_as_sglang_image_data(engine, server, tmp_path):
    from PIL import Image

    img = Image.new("RGB", (4, 3), (255, 0, 0))
    path = tmp_path / "x.png"
    img.save(path)
    engine.generate([Prompt(input_ids=[1], images=[img, path])], 1, GREEDY)
    pil_item, path_item = server.generate_bodies[-1]["image_data"]
    assert pil_item.startswith("data:image/png;base64,") and path_item == str(path)


# --- colocated weight sync --------------------------------------------------------------------

def test_update_weights_sequence_exact_tensors_and_version(engine, server, monkeypatch):
    flats_made, real = [], sglang_engine.flatten_bucket

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
    assert paths[:2] == ["/pause_generation", "/flush_cache"]
    assert paths[-2:] == ["/get_weight_version", "/continue_generation"]
    assert paths[2:-2] == ["/update_weights_from_tensor"] * len(uwt)
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
    engine = SGLangEngine.connect(server.url, use_sglang_serializer=False)
    assert engine.tp_size == 2
    engine.update_weights([new_weights(seed=2)], version=5)
    assert set(server.rank_payloads) == {2}
    # the multi-rank hook: one serialized bucket per engine TP rank, gathered by the caller
    named = new_weights(seed=3)
    reqs = [[s, s] for s in engine.serialize_bucket(named)[0]]
    engine.update_weights_serialized(reqs, version=6)
    assert engine.weight_version == 6 and all(same(server.weights[n], t) for n, t in named)
    with pytest.raises(ValueError):
        engine.update_weights_serialized([["only-one"]], version=7)
    assert engine.weight_version is None


def test_failed_sync_leaves_version_none_until_a_full_resync(engine, server):
    server.fail_at_bucket = 1
    with pytest.raises(RuntimeError, match="injected"):
        engine.update_weights(bucket_by_bytes(new_weights(seed=4), 40), version=2)
    assert engine.weight_version is None
    assert server.paused  # half-updated weights are not served
    with pytest.raises(StaleWeightsError):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    assert not engine.health()  # a paused engine does not generate
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
    with pytest.raises(RuntimeError, match="did not launch"):
        engine.restart()


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
    assert tags == [["kv_cache"], ["kv_cache"], None, None]


def test_disaggregated_requests(engine, server):
    engine.init_weight_update_group("10.0.0.1", 29600, rank_offset=1, world_size=3,
                                    group_name="g")
    engine.begin_weight_update()
    assert engine.weight_version is None and server.paused
    engine.update_weights_from_distributed(["a.weight"], [torch.bfloat16], [torch.Size([2, 3])],
                                           "g", version=None)
    engine.update_weights_from_distributed(["b.weight"], ["float32"], [[4]], "g", version=8)
    engine.continue_generation()
    assert engine.weight_version == 8 and server.weight_version == "8"
    init, first, last = [c[2] for c in server.calls if "group" in c[1] or "distributed" in c[1]]
    assert init == {"master_address": "10.0.0.1", "master_port": 29600, "rank_offset": 1,
                    "world_size": 3, "group_name": "g", "backend": "nccl"}
    assert first == {"names": ["a.weight"], "dtypes": ["bfloat16"], "shapes": [[2, 3]],
                     "group_name": "g", "flush_cache": False}
    assert last["weight_version"] == "8" and last["dtypes"] == ["float32"]
    engine.destroy_weight_update_group("g")
    with pytest.raises(RuntimeError, match="not found"):
        engine.update_weights_from_distributed(["a"], ["float32"], [[1]], "g", version=9)
    assert engine.weight_version is None


def test_http_errors_and_dead_urls():
    s = FakeSGLangServer().start()
    engine = SGLangEngine.connect(s.url, use_sglang_serializer=False)
    with pytest.raises(SGLangHTTPError, match="HTTP 404.*Not Found"):
        engine._post("/no_such_endpoint", {}, timeout=5)
    s.stop()
    assert not engine.health()
    with pytest.raises(EngineDeadError, match=s.url):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    with pytest.raises(EngineDeadError, match=s.url):
        SGLangEngine.connect(s.url)


# --- launch / restart (real processes) --------------------------------------------------------

def _launch(*extra, **kw):
    return SGLangEngine.launch("unused-model", command=FAKE_CMD + list(extra),
                               env={"PYTHONPATH": str(REPO)}, use_sglang_serializer=False,
                               startup_timeout=kw.pop("startup_timeout", 60), **kw)


def _state(engine):
    return engine._get("/fake/state", timeout=10)


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
        proc = engine._process
        engine.shutdown()
    assert proc.poll() is not None


def test_launch_reports_early_exit_with_log_tail(tmp_path):
    with pytest.raises(EngineDeadError, match="(?s)exited with code 3.*FAKE FATAL: no GPU"):
        _launch("--fail-on-start", "FAKE FATAL: no GPU", log_path=str(tmp_path / "s.log"))


def test_launch_times_out_and_kills_the_server(tmp_path, monkeypatch):
    procs = []
    real_popen = sglang_engine.subprocess.Popen
    monkeypatch.setattr(sglang_engine.subprocess, "Popen",
                        lambda *a, **k: procs.append(real_popen(*a, **k)) or procs[-1])
    log = tmp_path / "s.log"
    with pytest.raises(EngineDeadError, match=f"not healthy within 2s.*--startup-delay.*{log}"):
        _launch("--startup-delay", "60", startup_timeout=2, log_path=str(log))
    assert procs[0].poll() is not None  # killed, not left behind


def test_server_flags_without_sglang():
    flags = server_flags("/models/qwen", tp=2, mem_fraction_static=0.6, host="127.0.0.1",
                         port=31000, weight_version=0, extra_args=["--enable-memory-saver"])
    assert flags == ["--model-path", "/models/qwen", "--tp-size", "2", "--host", "127.0.0.1",
                     "--port", "31000", "--mem-fraction-static", "0.6", "--weight-version",
                     "0", "--enable-memory-saver"]
    if not sglang_engine.sglang_available():
        sglang_engine.validate_server_flags(["--no-such-flag"])  # nothing to validate against
