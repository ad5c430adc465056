"""Our SGLangEngine against SGLang 0.5.23's own server app (tests/sglang_api/sglang_app.py).

Every request goes through SGLang's FastAPI routes and request classes; weights are decoded by
SGLang's SafeUnpickler and flattened-bucket code and loaded only through its weight-update
manager (sessions, versions); image prompts are expanded by SGLang's own Qwen2.5-VL and InternVL
processors. What is checked is what a real server would do with our requests.
"""
import dataclasses
import http.server
import subprocess
import sys
import threading

import pytest
import torch
from PIL import Image

from eureka_megatron.rollout.buckets import bucket_by_bytes
from eureka_megatron.rollout.engine import Prompt, SamplingParams, StaleWeightsError
from eureka_megatron.rollout.sglang import (PromptMismatchError, SGLangEngine, SGLangRefused,
                                            server_flags, validate_server_flags)
from tests.sglang_api.sglang_app import SGLangApp

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)


def engine_for(app: SGLangApp, **kw) -> SGLangEngine:
    return SGLangEngine.connect(app.url, transport=app.transport, health_timeout=30, **kw)


def new_weights(app: SGLangApp, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(name, torch.randn(shape, generator=g).to(dtype))
            for name, (shape, dtype) in app.param_specs().items()]


def routes(app: SGLangApp) -> list[str]:
    return [path for path, _ in app.requests]


def assert_loaded(app: SGLangApp, sent) -> None:
    for name, t in sent:
        got = app.weights[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name


@pytest.fixture
def app():
    with SGLangApp() as a:
        yield a


def test_connect_reads_the_servers_own_info(app):
    engine = engine_for(app)
    assert engine.weight_version == 0 and engine.tp_size == 1 and engine.deterministic is False
    assert engine.get_server_weight_version() == "0"
    assert "/get_model_info" not in routes(app) and "/get_server_info" not in routes(app)


def test_colocated_sync_is_one_session_and_bit_exact(app):
    from sglang.srt.managers import io_struct

    engine = engine_for(app)
    before = engine.generate([Prompt(input_ids=[3, 4, 5])], 1, GREEDY)[0]
    sent = new_weights(app, seed=1)
    app.requests.clear()
    engine.update_weights(bucket_by_bytes(iter(sent), 64), version=1)
    assert_loaded(app, sent)
    assert app.weight_version == "1" and engine.weight_version == 1
    assert not app.session_open and not app.paused
    paths = routes(app)
    n = paths.count("/update_weights_from_tensor")
    assert n >= 3  # several buckets and dtypes
    assert paths == (["/pause_generation", "/flush_cache", "/begin_weight_update"]
                     + ["/update_weights_from_tensor"] * n
                     + ["/end_weight_update", "/model_info", "/continue_generation"])
    kinds = {path: type(obj) for path, obj in app.requests}
    assert kinds["/pause_generation"] is io_struct.PauseGenerationReqInput
    assert kinds["/begin_weight_update"] is io_struct.BeginWeightUpdateReqInput
    assert kinds["/update_weights_from_tensor"] is io_struct.UpdateWeightsFromTensorReqInput
    assert kinds["/end_weight_update"] is io_struct.EndWeightUpdateReqInput
    assert kinds["/continue_generation"] is io_struct.ContinueGenerationReqInput
    updates = [obj for path, obj in app.requests if path == "/update_weights_from_tensor"]
    assert [u.weight_version for u in updates] == [None] * (n - 1) + ["1"]
    after = engine.generate([Prompt(input_ids=[3, 4, 5])], 1, GREEDY)[0]
    assert after.weight_version == 1 and after.token_ids != before.token_ids


def test_failed_sync_closes_the_session_and_the_next_one_loads(app):
    engine = engine_for(app)
    app.fail_next_tensor_update = True
    with pytest.raises(SGLangRefused):
        engine.update_weights([new_weights(app, seed=2)], version=2)
    assert engine.weight_version is None and not app.session_open
    assert app.paused  # nothing half-updated is served
    with pytest.raises(StaleWeightsError):
        engine.generate([Prompt(input_ids=[1])], 1, GREEDY)
    assert engine.health()  # alive while our sync holds it paused
    sent = new_weights(app, seed=3)
    engine.update_weights([sent], version=2)
    assert_loaded(app, sent)
    assert engine.generate([Prompt(input_ids=[1])], 1, GREEDY)[0].weight_version == 2


def test_a_session_left_open_is_closed_and_reopened(app):
    engine = engine_for(app)
    app.transport("POST", app.url + "/begin_weight_update", b"{}",
                  {"Content-Type": "application/json"}, 10)
    assert app.session_open  # another client died inside its sync
    sent = new_weights(app, seed=4)
    engine.update_weights([sent], version=3)
    assert_loaded(app, sent)
    assert not app.session_open and app.weight_version == "3"


def test_memory_release_and_resume_name_their_tags(app):
    engine = engine_for(app)
    engine.release_memory(["kv_cache"])
    engine.resume_memory()  # SGLang itself would raise KeyError on resume without tags
    engine.release_memory()
    assert engine.weight_version is None  # the weights are gone without a CPU backup
    engine.resume_memory()
    sent = new_weights(app, seed=5)
    engine.update_weights([sent], version=4)
    assert_loaded(app, sent)
    from sglang.srt.managers import io_struct

    kinds = {path: type(obj) for path, obj in app.requests}
    assert kinds["/release_memory_occupation"] is io_struct.ReleaseMemoryOccupationReqInput
    assert kinds["/resume_memory_occupation"] is io_struct.ResumeMemoryOccupationReqInput
    resumed = [obj.tags for path, obj in app.requests if path == "/resume_memory_occupation"]
    assert resumed == [["kv_cache"], ["weights", "kv_cache", "cuda_graph"]]


def test_seeds_are_honoured_only_by_a_deterministic_server():
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6, seed=7)
    prompts = [Prompt(input_ids=[2, 3]), Prompt(input_ids=[5])]
    with SGLangApp(enable_deterministic_inference=True) as app:
        engine = engine_for(app)
        assert engine.deterministic
        a = engine.generate(prompts, 3, sampled)
        b = engine.generate(prompts, 3, sampled)
        assert [s.token_ids for s in a] == [s.token_ids for s in b]
        assert len({tuple(s.token_ids) for s in a[:3]}) > 1  # n distinct seeds, not one
    with SGLangApp() as app:
        engine = engine_for(app)
        assert not engine.deterministic
        engine.generate(prompts, 3, sampled)
        bodies = [obj for path, obj in app.requests if path == "/generate"]
        assert all("sampling_seed" not in (obj.sampling_params or {}) for obj in bodies)


def test_launch_flags_pass_sglangs_own_parser():
    validate_server_flags(server_flags("/models/m", tp=2, mem_fraction_static=0.5,
                                       deterministic=True,
                                       extra_args=["--enable-memory-saver"]))
    with pytest.raises(ValueError, match=r"\['--no-such-flag'\]") as e:
        validate_server_flags(server_flags("/models/m", extra_args=["--no-such-flag"]))
    assert len(str(e.value)) < 400  # a reason, not argparse's usage text
    with pytest.raises(ValueError, match="--tp-size"):
        validate_server_flags(["--model-path", "/m", "--tp-size", "two"])


def test_routed_experts_request_and_answer_are_sglangs():
    """Routing replay's SGLang side: the server flag passes SGLang's parser, SGLang's request class
    takes our body's field, and our decoder of meta_info.routed_experts reads what SGLang's
    tokenizer manager encodes exactly as SGLang's own decoder does."""
    import pybase64
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

    from eureka_megatron.rollout.sglang.flags import ROUTED_EXPERTS_FLAG
    from eureka_megatron.rollout.sglang.prompts import generate_bodies, parse_sample

    validate_server_flags(server_flags("/models/m", extra_args=[ROUTED_EXPERTS_FLAG]))
    sp = SamplingParams(max_new_tokens=4, return_routed_experts=True)
    (body,) = generate_bodies(Prompt(input_ids=[5, 6, 7]), 0, 1, sp, family=None, seeded=False)
    assert GenerateReqInput(**body).return_routed_experts is True
    experts = torch.randint(0, 128, (3 + 4 - 1, 5, 8), dtype=torch.int32)  # 5 layers, top 8
    meta = {"finish_reason": {"type": "length"}, "prompt_tokens": 3,
            "output_token_logprobs": [(-0.5, t, None) for t in (11, 12, 13, 14)],
            # as sglang/srt/managers/tokenizer_manager.py encodes a tensor of routed experts
            "routed_experts": pybase64.b64encode(experts.numpy().tobytes()).decode("utf-8")}
    sample = parse_sample({"text": "", "meta_info": meta}, 0, 1, 3, "http://s", True)
    theirs = extract_routed_experts_from_meta_info({"meta_info": meta})
    assert torch.equal(sample.routed_experts.flatten(), torch.from_numpy(theirs.copy()))
    assert torch.equal(sample.routed_experts.view(6, 5, 8), experts)
    del meta["routed_experts"]
    with pytest.raises(RuntimeError, match=ROUTED_EXPERTS_FLAG):
        parse_sample({"text": "", "meta_info": meta}, 0, 1, 3, "http://s", True)


# --- image prompts through SGLang's own processors -------------------------------------------

def image(color, size=(56, 56)):
    return Image.new("RGB", size, color)


@pytest.fixture(scope="module")
def qwen_builder(qwen_vl_dir):
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder

    return PromptBuilder("qwen2_5_vl", AutoTokenizer.from_pretrained(str(qwen_vl_dir)),
                         system_prompt=None, max_prompt_length=8192)


def row(images, question="How many circles?"):
    from eureka_megatron.data.jsonl import Row

    return Row(id="r", images=[str(p) for p in images], question=question, answer="1",
               source="test:1")


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for i, (size, color) in enumerate([((112, 112), (200, 30, 30)), ((84, 56), (0, 90, 200)),
                                       ((300, 200), (10, 200, 60))]):
        paths.append(tmp_path / f"im{i}.png")
        image(color, size).save(paths[-1])
    return paths


def test_qwen_prompts_are_expanded_by_sglang_to_the_trainers_ids(qwen_vl_dir, qwen_builder,
                                                                 image_files):
    with SGLangApp(qwen_vl_dir, family="qwen2_5_vl") as app:
        engine = engine_for(app)
        assert engine.family == "qwen2_5_vl"  # from /model_info's model_type
        one = qwen_builder.build(row(image_files[:1])).prompt
        two = qwen_builder.build(row(image_files[1:])).prompt
        samples = engine.generate([one, two], 1, GREEDY)
        assert [s.prompt_index for s in samples] == [0, 1]
        assert sorted(app.prompt_tokens) == sorted([len(one.input_ids), len(two.input_ids)])
        assert sorted(app.expanded_input_ids) == sorted([one.input_ids, two.input_ids])
        app.expanded_input_ids.clear()
        got = engine.generate([two], 3, GREEDY)  # two images, n > 1: one list per prompt
        assert len(got) == 3 and app.expanded_input_ids[-1] == two.input_ids


def test_a_prompt_sglang_expands_differently_is_refused(qwen_vl_dir, qwen_builder, image_files):
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder

    other = PromptBuilder("qwen2_5_vl", AutoTokenizer.from_pretrained(qwen_vl_dir),
                          system_prompt=None, max_prompt_length=8192,
                          max_pixels=28 * 28 * 16)  # smaller than the server resizes to
    prompt = other.build(row(image_files[2:])).prompt
    with SGLangApp(qwen_vl_dir, family="qwen2_5_vl") as app:
        with pytest.raises(PromptMismatchError, match="prompt 0: SGLang counted"):
            engine_for(app).generate([prompt], 1, GREEDY)


def test_internvl_prompts_with_one_placeholder_per_image(internvl_dir, image_files):
    """Where SGLang 0.5.23 tiles an image as InternVL does, its expansion of `<image>` is the
    trainer's; where it does not, the engine refuses the prompt instead of sampling from it --
    and a run on SGLang tiles with SGLang's tie rule, so they agree again.

    SGLang's InternVL processor breaks aspect-ratio ties towards the most tiles
    (multimodal/processors/internvl.py, dynamic_preprocess); InternVL's own
    find_closest_aspect_ratio (and models/internvl/images.py) takes more tiles only while the image is
    larger than half their area. A 3:2 image has one closest ratio (3x2 tiles + thumbnail) in
    both; a small square one is 1 tile for InternVL and 3x3 + thumbnail for SGLang."""
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder

    tok = AutoTokenizer.from_pretrained(internvl_dir)
    # the tiny checkpoint's towers give (56/14)^2 * 0.5^2 = 4 tokens per 448-px tile: as ours
    builder = PromptBuilder("internvl", tok, system_prompt=None, max_prompt_length=8192,
                            patch_size=112)
    with SGLangApp(internvl_dir, family="internvl") as app:
        engine = engine_for(app)
        assert engine.family == "internvl"
        three_by_two = builder.build(row(image_files[1:])).prompt  # 84x56 and 300x200
        samples = engine.generate([three_by_two], 2, GREEDY)
        assert len(samples) == 2 and app.expanded_input_ids[-1] == three_by_two.input_ids
        body = next(obj for path, obj in app.requests[::-1] if path == "/generate")
        assert body.text.count("<image>") == 2 and "<IMG_CONTEXT>" not in body.text
        square = builder.build(row(image_files[:1])).prompt  # 112x112
        with pytest.raises(PromptMismatchError, match="SGLang counted"):
            engine.generate([square], 1, GREEDY)
        context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
        assert square.input_ids.count(context) == 4  # one tile
        assert app.expanded_input_ids[-1].count(context) == 40  # SGLang: 3x3 + thumbnail
        # a run on SGLang engines builds its prompts with SGLang's tie rule (data/sources.py)
        theirs = PromptBuilder("internvl", tok, system_prompt=None, max_prompt_length=8192,
                               patch_size=112, ties_to_most_tiles=True)
        square = theirs.build(row(image_files[:1])).prompt
        assert len(engine.generate([square], 2, GREEDY)) == 2
        assert app.expanded_input_ids[-1] == square.input_ids
        assert square.input_ids.count(context) == 40


def test_internvl_max_tiles_reach_sglang_with_every_sample(internvl_dir, tmp_path):
    """data.max_tiles other than SGLang's 12: each of a prompt's n samples goes as a single
    request carrying image_max_dynamic_patch (a batched request would lose it), so SGLang tiles
    the image as the trainer did. A 200x100 image: 2x1 tiles + thumbnail at max 4 (both); at
    SGLang's 12 it would be 4x2 + thumbnail."""
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder

    path = tmp_path / "wide.png"
    image((10, 200, 60), (200, 100)).save(path)
    tok = AutoTokenizer.from_pretrained(internvl_dir)
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    builder = PromptBuilder("internvl", tok, system_prompt=None, max_prompt_length=8192,
                            patch_size=112, max_tiles=4)
    prompt = builder.build(row([path])).prompt
    assert prompt.max_tiles == 4 and prompt.input_ids.count(context) == 12
    with SGLangApp(internvl_dir, family="internvl") as app:
        for engine in (engine_for(app), engine_for(app, deterministic=True)):
            seen = len(app.expanded_input_ids)
            samples = engine.generate([prompt], 3, SamplingParams(max_new_tokens=2, seed=7))
            assert len(samples) == 3
            assert app.expanded_input_ids[seen:] == [prompt.input_ids] * 3
        bodies = [obj for path, obj in app.requests if path == "/generate"]
        assert [b.image_max_dynamic_patch for b in bodies[-6:]] == [4] * 6
        plain = PromptBuilder("internvl", tok, system_prompt=None, max_prompt_length=8192,
                              patch_size=112).build(row([path])).prompt
        assert plain.input_ids.count(context) == 12  # InternVL's rule at 12: still 2x1 here
        with pytest.raises(PromptMismatchError, match="SGLang counted"):
            engine_for(app).generate([dataclasses.replace(prompt, max_tiles=None)], 2, GREEDY)
        assert app.expanded_input_ids[-1].count(context) == 36  # SGLang's own 12: 4x2 + thumbnail


# --- the distributed transport: the trainer in another process, as in production -------------

TRAINER = """
import sys, torch
from eureka_megatron.rollout.sglang import SGLangEngine
url, path = sys.argv[1], sys.argv[2]
named = torch.load(path)
engine = SGLangEngine.connect(url, weight_transport="distributed", update_group_backend="gloo")
engine.update_weights([named[:1], named[1:]], version=5)
engine.update_weights([named[::-1]], version=6)   # the group is kept between syncs
print("synced", engine.weight_version, flush=True)
"""


class _Forward(http.server.BaseHTTPRequestHandler):
    """Plain HTTP in front of the in-process app, so a trainer process can reach it."""
    app: SGLangApp

    def log_message(self, *args):
        pass

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        status, raw = self.app.transport(self.command, self.app.url + self.path, body,
                                         dict(self.headers), 120)
        self.send_response(status)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = _forward


def test_distributed_sync_through_sglangs_own_weight_update_group(app, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    sent = new_weights(app, seed=6)
    torch.save(sent, tmp_path / "named.pt")
    handler = type("Forward", (_Forward,), {"app": app})
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        out = subprocess.run([sys.executable, "-c", TRAINER,
                              f"http://127.0.0.1:{front.server_address[1]}",
                              str(tmp_path / "named.pt")],
                             capture_output=True, text=True, timeout=120)
    finally:
        front.shutdown()
    assert out.stdout.strip() == "synced 6", out.stderr[-3000:]
    assert_loaded(app, sent)
    assert app.weight_version == "6" and not app.session_open and not app.paused
    paths = routes(app)
    assert paths.count("/init_weights_update_group") == 1
    updates = [obj for path, obj in app.requests if path == "/update_weights_from_distributed"]
    assert all(u.load_format == "flattened_bucket" for u in updates) and len(updates) >= 4


# one group per pipeline stage, the sources in the trainer's process, the requests from our engine
STAGES = """
import sys, threading, torch
from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket
from eureka_megatron.rollout.engine import GroupJoin
from eureka_megatron.rollout.sglang import SGLangEngine
from eureka_megatron.rollout.sglang.update_group import WeightUpdateGroup
from eureka_megatron.runtime.ports import free_port
url, path = sys.argv[1], sys.argv[2]
engine = SGLangEngine.connect(url, weight_transport="distributed", update_group_backend="gloo")
names = ["eureka-pp0", "eureka-pp1"]
join = GroupJoin(tuple((n, "127.0.0.1", free_port()) for n in names), 2, 1, "gloo")
groups, errors = {}, []

def sync(named, version, join):
    half = len(named) // 2
    flats = [[f for b in bucket_by_bytes(part, 256) for f in flatten_bucket(b)]
             for part in (named[:half], named[half:])]
    abort = threading.Event()

    def receive():
        try:
            engine.receive_weights([(n, [f.metadata for f in fl]) for n, fl in zip(names, flats)],
                                   version, abort=abort, join=join)
        except Exception as e:
            errors.append(e)

    def send(s):
        if join is not None:
            groups[s] = WeightUpdateGroup("127.0.0.1", join.groups[s][2], 2,
                                          group_name=names[s], backend="gloo", timeout=60)
        for f in flats[s]:
            groups[s].broadcast(f.tensor.view(torch.uint8)).wait()

    threads = [threading.Thread(target=receive)] + [
        threading.Thread(target=send, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not abort.is_set(), errors

first, second = torch.load(path)
sync(first, 5, join)
sync(second, 6, None)  # the groups are kept between syncs
print("synced", engine.weight_version, sorted(engine.receiver_info().joined), flush=True)
"""


def test_each_pipeline_stage_broadcasts_into_a_group_of_its_own(app, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    first, second = new_weights(app, seed=8), new_weights(app, seed=9)
    torch.save((first, second), tmp_path / "named.pt")
    handler = type("Forward", (_Forward,), {"app": app})
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    try:
        out = subprocess.run([sys.executable, "-c", STAGES,
                              f"http://127.0.0.1:{front.server_address[1]}",
                              str(tmp_path / "named.pt")],
                             capture_output=True, text=True, timeout=120)
    finally:
        front.shutdown()
    assert out.stdout.strip() == "synced 6 ['eureka-pp0', 'eureka-pp1']", out.stderr[-3000:]
    assert_loaded(app, second)
    assert app.weight_version == "6" and not app.session_open and not app.paused
    inits = [obj for path, obj in app.requests if path == "/init_weights_update_group"]
    assert [(i.group_name, i.rank_offset, i.world_size) for i in inits] == [
        ("eureka-pp0", 1, 2), ("eureka-pp1", 1, 2)]
    updates = [obj for path, obj in app.requests if path == "/update_weights_from_distributed"]
    last_sync = updates[len(updates) // 2:]
    groups = [u.group_name for u in last_sync]
    assert groups == sorted(groups) and set(groups) == {"eureka-pp0", "eureka-pp1"}
    assert [u.weight_version for u in last_sync] == [None] * (len(last_sync) - 1) + ["6"]
    assert all(u.load_format == "flattened_bucket" for u in updates)
