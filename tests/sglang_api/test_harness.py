"""The harness really runs SGLang 0.5.23's code: raw HTTP through `SGLangApp.transport`, answers
that only SGLang's own code produces (its messages, status codes, processors, serializer)."""
from __future__ import annotations

import base64
import dataclasses
import io
import pickle
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image

from tests.sglang_api.sglang_app import SGLangApp  # first: stubs GPU imports, or skips

from eureka_megatron.runtime.ports import free_port
from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

IMAGE_PAD, VISION_START = "<|image_pad|>", "<|vision_start|>"
QWEN_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture
def app():
    with SGLangApp() as running:
        yield running


def _image(size=(56, 56), color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _new_weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype)
            for name, (shape, dtype) in SGLangApp.param_specs().items()}


def _pickled(obj) -> str:
    """base64 pickle, CPU tensors by value. Not MultiprocessingSerializer.serialize: once the
    in-process server ran monkey_patch_torch_reductions(), torch's ForkingPickler reductions are
    SGLang's CUDA-only ones for this whole process (a real client is another process)."""
    return base64.b64encode(pickle.dumps(obj)).decode()


def _bucket_payload(weights: dict[str, torch.Tensor]) -> str:
    """A flattened-bucket payload of SGLang's own FlattenedTensorBucket and metadata class."""
    bucket = FlattenedTensorBucket(named_tensors=list(weights.items()))
    return _pickled({"flattened_tensor": bucket.get_flattened_tensor(),
                     "metadata": bucket.get_metadata()})


def _generate(app, **body):
    body.setdefault("sampling_params", {"max_new_tokens": 4, "temperature": 0})
    return app.post("/generate", body)


def test_weight_update_session_rules(app):
    status, out = app.post("/update_weights_from_tensor",
                           {"serialized_named_tensors": [], "load_format": "flattened_bucket"})
    assert (status, out["success"]) == (400, False)
    assert out["message"] == ("update_weights_from_tensor must run between begin_weight_update() "
                              "and end_weight_update()")
    assert app.post("/begin_weight_update", {}) == (200, {"success": True, "message": "Success"})
    assert app.session_open
    status, out = app.post("/begin_weight_update", {"selector": "all"})
    assert status == 400 and "already open" in out["message"]
    assert app.post("/end_weight_update", {})[0] == 200
    status, out = app.post("/end_weight_update", {})
    assert status == 400 and out["message"].startswith("no weight-update session is open")
    assert not app.session_open
    assert [path for path, _ in app.requests[-5:]] == [
        "/update_weights_from_tensor", "/begin_weight_update", "/begin_weight_update",
        "/end_weight_update", "/end_weight_update"]
    assert type(app.requests[-4][1]).__name__ == "BeginWeightUpdateReqInput"


def test_bodies_are_parsed_by_sglang(app):
    status, out = app.post("/begin_weight_update", {"selector": 3})  # msgspec/pydantic model
    assert status == 400 and out["object"] == "error" and "selector" in out["message"]
    status, out = _generate(app, text="how", sampling_params={"max_new_tokens": "four"})
    assert status == 400 and "error" in out  # the /generate contract gate (api_contract.py)
    status, out = _generate(app, text="how many", sampling_params={"temperature": -1})
    assert status == 400 and "temperature" in out["error"]["message"]  # SamplingParams.verify


def test_generate_answers_in_sglangs_shape(app):
    status, out = _generate(app, input_ids=[5, 6, 7], return_logprob=True)
    assert status == 200 and set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["weight_version"]) == (3, 4, "0")
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert all(text is None for _, _, text in meta["output_token_logprobs"])
    status, outs = _generate(app, input_ids=[[5, 6], [7, 8, 9]],
                             sampling_params={"max_new_tokens": 2, "n": 2, "temperature": 1.0})
    assert status == 200 and [o["meta_info"]["prompt_tokens"] for o in outs] == [2, 2, 3, 3]


def test_flattened_bucket_update_loads_bit_exact(app):
    new = _new_weights(seed=1)
    before = _generate(app, input_ids=[5, 6, 7])[1]["output_ids"]
    assert app.post("/begin_weight_update", {})[0] == 200
    status, out = app.post("/update_weights_from_tensor", {
        "serialized_named_tensors": [_bucket_payload(new)], "load_format": "flattened_bucket",
        "weight_version": "7"})
    assert (status, out["success"]) == (200, True), out
    assert out["message"] == "Success Weight version updated to 7."
    assert app.post("/end_weight_update", {})[0] == 200
    for name, tensor in new.items():
        assert app.weights[name].dtype == tensor.dtype
        assert torch.equal(app.weights[name], tensor), name
    assert app.weight_version == "7" and app.get("/model_info")[1]["weight_version"] == "7"
    after = _generate(app, input_ids=[5, 6, 7])
    assert after[1]["meta_info"]["weight_version"] == "7"
    assert after[1]["output_ids"] != before


def test_failed_tensor_update_is_sglangs_failure_answer(app):
    assert app.post("/begin_weight_update", {})[0] == 200
    app.fail_next_tensor_update = True
    status, out = app.post("/update_weights_from_tensor", {
        "serialized_named_tensors": [_bucket_payload(_new_weights(2))],
        "load_format": "flattened_bucket", "weight_version": "never"})
    assert (status, out["success"]) == (400, False)
    assert "injected failure" in out["message"]
    assert app.weight_version != "never" and app.session_open
    assert app.post("/end_weight_update", {})[0] == 200


def test_flush_refused_while_generating(app):
    app.decode_step_delay = 0.02
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=_generate(
            app, input_ids=[5], sampling_params={"max_new_tokens": 40, "ignore_eos": True})))
        worker.start()
        deadline = time.monotonic() + 5
        while not app.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.005)
        status, text = app.post("/flush_cache")
        assert (status, text) == (400, "Flush cache failed.\n")
        worker.join(10)
        assert result["out"][0] == 200
    finally:
        app.decode_step_delay = 0.0
    status, text = app.post("/flush_cache")
    assert status == 200 and text.startswith("Cache flushed.")


def test_generate_waits_while_paused(app):
    assert app.post("/pause_generation", {"mode": "in_place"})[0] == 200 and app.paused
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=_generate(app, input_ids=[9])))
    worker.start()
    started = time.monotonic()
    # Its one-token probe waits behind the pause too (/health probes the same way by default,
    # SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=1), and a 503 marks the server UnHealthy.
    assert app.get("/health_generate")[0] == 503
    assert time.monotonic() - started >= app.health_check_timeout
    assert "out" not in result
    assert app.post("/continue_generation", {})[0] == 200
    worker.join(10)
    assert result["out"][0] == 200 and not app.paused
    assert app.get("/health")[0] == 200


@dataclasses.dataclass
class OwnMetadata:
    """A client's own metadata class: not on SGLang's SafeUnpickler allow-list."""
    name: str


def test_foreign_class_in_payload_is_refused_by_safe_unpickler():
    payload = _pickled({"flattened_tensor": torch.zeros(1), "metadata": [OwnMetadata("x")]})
    with SGLangApp() as app:
        assert app.post("/begin_weight_update", {})[0] == 200
        with pytest.raises(ConnectionResetError):  # SGLang's scheduler dies on it
            app.post("/update_weights_from_tensor", {"serialized_named_tensors": [payload],
                                                      "load_format": "flattened_bucket"})
        assert str(app.server_error) == ("Blocked unsafe global (tests.sglang_api.test_harness."
                                         "OwnMetadata) during pickle deserialization")


def test_resume_without_tags_after_partial_release_raises_keyerror():
    with SGLangApp() as app:
        assert app.post("/release_memory_occupation", {"tags": ["kv_cache"]}) == (200, None)
        with pytest.raises(ConnectionResetError):
            app.post("/resume_memory_occupation", {})
        assert isinstance(app.server_error, KeyError)


def test_qwen2_5_vl_expands_one_placeholder_per_image(qwen_vl_dir):
    from transformers import AutoImageProcessor

    images = [_image((112, 112)), _image((84, 56), (0, 90, 200))]
    with SGLangApp(qwen_vl_dir, family="qwen2_5_vl") as app:
        text = f"{QWEN_PLACEHOLDER} and {QWEN_PLACEHOLDER} how many circles"
        status, out = _generate(app, text=text, image_data=images)
        assert status == 200, out
        pad_id = app.tokenizer_manager.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        ids = app.expanded_input_ids[-1]
        grids = AutoImageProcessor.from_pretrained(qwen_vl_dir)(
            images=[Image.open(io.BytesIO(base64.b64decode(i.split(",")[1]))) for i in images]
        )["image_grid_thw"]
        assert ids.count(pad_id) == int(grids.prod(-1).sum()) // 4 > 2  # one run per image
        assert ids.count(app.tokenizer_manager.tokenizer.convert_tokens_to_ids(VISION_START)) == 2
        assert out["meta_info"]["prompt_tokens"] == len(ids) == app.prompt_tokens[-1]
        status, out = _generate(app, text=text, image_data=images,
                                sampling_params={"max_new_tokens": 2, "n": 2})
        assert status == 400  # a flat image list with n > 1 (io_struct normalization)
        status, out = _generate(app, text=[text], image_data=[images],
                                sampling_params={"max_new_tokens": 2, "n": 2})
        assert status == 200 and len(out) == 2


def test_internvl_refuses_pretokenized_ids_with_raw_images(internvl_dir):
    with SGLangApp(internvl_dir, family="internvl") as app:
        status, out = _generate(app, input_ids=[5, 6, 7], image_data=[_image()])
        assert status == 400
        assert "[internvl] Cannot process raw images/videos with pre-tokenized input_ids" in \
            out["error"]["message"]
        status, out = _generate(app, text="<image>\nhow many circles", image_data=[_image()])
        assert status == 200, out
        tok = app.tokenizer_manager.tokenizer
        ids = app.expanded_input_ids[-1]
        # 56x56: 3x3 tiles of 448 px + a thumbnail, 4 <IMG_CONTEXT> each, inside <img></img>
        assert ids.count(tok.convert_tokens_to_ids("<IMG_CONTEXT>")) == 40
        assert ids.count(tok.convert_tokens_to_ids("<img>")) == 1
        assert out["meta_info"]["prompt_tokens"] == len(ids)


def test_internvl_tiles_every_batched_request_its_own_way(internvl_dir):
    """Why our client sends a tiled prompt's n samples as n single requests
    (`rollout/sglang/prompts.generate_bodies`): SGLang's processor honours
    image_max_dynamic_patch on a single request, but a batched one loses it when
    GenerateReqInput splits the batch, and is tiled up to 12 with a thumbnail
    (`models/internvl/images.SGLANG_TILING`)."""
    from eureka_megatron.models.internvl.images import SGLANG_TILING
    from sglang.srt.multimodal.processors.internvl import InternVLProcessor

    assert InternVLProcessor.IMAGE_MAX_NUM == SGLANG_TILING["max_tiles"] == 12
    text = "<image>\nhow many circles"
    with SGLangApp(internvl_dir, family="internvl") as app:
        context = app.tokenizer_manager.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
        status, out = _generate(app, text=text, image_data=[_image()], image_max_dynamic_patch=2)
        assert status == 200, out
        assert app.expanded_input_ids[-1].count(context) == 4  # at most 2 tiles: 1, no thumbnail
        status, out = _generate(app, text=[text], image_data=[[_image()]],
                                image_max_dynamic_patch=2,
                                sampling_params={"max_new_tokens": 2, "temperature": 0, "n": 2})
        assert status == 200 and len(out) == 2, out
        assert app.expanded_input_ids[-1].count(context) == 40  # 3x3 tiles + thumbnail: 12 max


def test_internvl_tile_counts_with_sglangs_tie_rule_are_sglangs():
    """`tile_grid(..., ties_to_most_tiles=True)` picks as many tiles as SGLang's own
    dynamic_preprocess for every size and limit swept (its grid choice does not depend on the tile
    size, only its resize does: 28 px keeps this fast); InternVL's rule at 448 px differs on ties."""
    from eureka_megatron.models.internvl.images import tile_grid
    from sglang.srt.multimodal.processors.internvl import InternVLProcessor

    sizes = [(56, 56), (112, 112), (84, 56), (300, 200), (200, 100), (60, 250), (448, 448),
             (900, 450), (1000, 700), (33, 470), (640, 480), (1280, 720)]
    differ = 0
    for w, h in sizes:
        for max_tiles in (1, 2, 4, 6, 12):
            theirs = InternVLProcessor.dynamic_preprocess(torch.zeros(3, h, w), image_size=28,
                                                          max_num=max_tiles).shape[0]
            cols, rows = tile_grid(w, h, image_size=28, max_tiles=max_tiles,
                                   ties_to_most_tiles=True)
            assert cols * rows == theirs, (w, h, max_tiles)
            internvl = tile_grid(w, h, image_size=448, max_tiles=max_tiles)  # its size matters
            differ += internvl[0] * internvl[1] != theirs
    assert differ > 0  # the two rules do disagree on some of these


# The trainer, rank 0, in its own process: torch only, joining the group the way SGLang's
# init_custom_process_group does (a PrefixStore(group_name) over the tcp:// rendezvous store).
TRAINER = """
import sys, torch, torch.distributed as dist
from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                _world, default_pg_timeout, rendezvous)
port, group, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, 2))
pg, _ = _new_process_group_helper(2, 0, [], Backend("gloo"), PrefixStore(group, store),
                                  group_name=group, timeout=default_pg_timeout)
_world.pg_group_ranks[pg] = {0: 0, 1: 1}
dist.broadcast(torch.load(path), src=0, group=pg)
print("broadcast done", flush=True)
"""


def test_gloo_distributed_update_round_trip(app, tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    port, group = free_port(), "eureka_sync"
    new = _new_weights(seed=3)
    bucket = FlattenedTensorBucket(named_tensors=list(new.items()))
    torch.save(bucket.get_flattened_tensor(), tmp_path / "flat.pt")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(port), group,
                                str(tmp_path / "flat.pt")], stdout=subprocess.PIPE, text=True)
    try:
        status, out = app.post("/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
            "world_size": 2, "group_name": group, "backend": "gloo"})
        assert (status, out) == (200, {"success": True, "message":
                                       "Succeeded to initialize custom process group."})
        assert app.post("/begin_weight_update", {})[0] == 200
        meta = bucket.get_metadata()
        status, out = app.post("/update_weights_from_distributed", {
            "names": [m.name for m in meta],
            "dtypes": [str(m.dtype).removeprefix("torch.") for m in meta],
            "shapes": [list(m.shape) for m in meta], "group_name": group,
            "load_format": "flattened_bucket", "weight_version": "d1"})
        assert (status, out["success"]) == (200, True), out
        assert trainer.communicate(timeout=30)[0].strip() == "broadcast done"
    finally:
        trainer.kill()
    assert app.post("/end_weight_update", {})[0] == 200
    assert all(torch.equal(app.weights[n], t) for n, t in new.items())
    assert app.weight_version == "d1"
    assert app.post("/destroy_weights_update_group", {"group_name": group})[0] == 200


def test_sampling_seed_needs_deterministic_inference():
    body = dict(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 16, "temperature": 1.0,
                                                       "sampling_seed": 11})
    with SGLangApp() as app:
        assert _generate(app, **body)[1]["output_ids"] != _generate(app, **body)[1]["output_ids"]
    with SGLangApp(enable_deterministic_inference=True) as det:
        assert _generate(det, **body)[1]["output_ids"] == _generate(det, **body)[1]["output_ids"]
