"""SGLangEngine against a real SGLang server: launch a small model, generate, push the same
model's weights (from its safetensors, on the GPU) through flattened buckets over CUDA IPC, and
check generation is unchanged and the new weight version is reported.

Needs sglang, a CUDA GPU and EUREKA_SGLANG_MODEL = a local HF checkpoint directory of a small
text model (e.g. Qwen2.5-0.5B-Instruct); skipped otherwise.
"""
import glob
import os

import pytest
import torch

pytestmark = [pytest.mark.sglang, pytest.mark.gpu]
pytest.importorskip("sglang")
MODEL = os.environ.get("EUREKA_SGLANG_MODEL")
if not MODEL:
    pytest.skip("set EUREKA_SGLANG_MODEL to a local HF checkpoint directory",
                allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket, unflatten_bucket  # noqa: E402
from eureka_megatron.rollout.engine import Prompt, SamplingParams  # noqa: E402
from eureka_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from eureka_megatron.rollout.sglang.payload import serialize_flat_bucket  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)


def hf_tensors(model_dir: str, device: str = "cuda"):
    from safetensors import safe_open

    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with safe_open(path, framework="pt", device=device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@pytest.fixture(scope="module")
def engine():
    e = SGLangEngine.launch(MODEL, mem_fraction_static=0.4, startup_timeout=900,
                            extra_args=["--random-seed", "0"])
    try:
        yield e
    finally:
        e.shutdown()


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    return [Prompt(input_ids=tok(t)["input_ids"]) for t in
            ("The capital of France is", "Question: 12 * 7 = ?\nAnswer:")]


def test_cuda_ipc_payloads_read_back_by_sglangs_own_deserializer():
    """CUDA tensors as IPC handles named by device UUID: what SGLang's own serializer writes
    after its monkey patch, written here without patching torch."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    named = [("a", torch.randn(3, 4, device="cuda").to(torch.bfloat16)),
             ("b", torch.randn(5, device="cuda")), ("c", torch.tensor(2.0, device="cuda"))]
    for flat in flatten_bucket(named):
        payload = MultiprocessingSerializer.deserialize(serialize_flat_bucket(flat))
        theirs = FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"],
                                       metadata=payload["metadata"]).reconstruct_tensors()
        ours = unflatten_bucket(flat)
        assert [n for n, _ in ours] == [n for n, _ in theirs]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))


def test_generate_then_sync_the_same_weights(engine, prompts):
    assert engine.health() and engine.weight_version == 0
    before = engine.generate(prompts, 2, GREEDY)
    assert [s.prompt_index for s in before] == [0, 0, 1, 1]
    assert all(s.weight_version == 0 and 0 < len(s.token_ids) == len(s.logprobs) for s in before)
    assert all(lp <= 0 for s in before for lp in s.logprobs)

    engine.update_weights(bucket_by_bytes(hf_tensors(MODEL), 64 << 20), version=1)
    assert engine.weight_version == 1 and engine.get_server_weight_version() == "1"
    after = engine.generate(prompts, 2, GREEDY)
    assert [s.token_ids for s in after] == [s.token_ids for s in before]
    assert [s.text for s in after] == [s.text for s in before]
    for a, b in zip(after, before):
        assert a.weight_version == 1
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-2


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the engine on another GPU")
def test_distributed_sync_over_nccl_to_an_engine_on_its_own_gpu(prompts):
    """The disaggregated path: the server on GPU 1, this process (rank 0 of SGLang's weight-update
    group) broadcasting the model's tensors from GPU 0, inside one weight-update session."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(
        str(i) for i in range(torch.cuda.device_count()))).split(",")
    e = SGLangEngine.launch(MODEL, mem_fraction_static=0.4, startup_timeout=900,
                            weight_transport="distributed", env={"CUDA_VISIBLE_DEVICES": visible[1]},
                            extra_args=["--random-seed", "0"])
    try:
        before = e.generate(prompts, 1, GREEDY)
        e.update_weights(bucket_by_bytes(hf_tensors(MODEL, "cuda:0"), 64 << 20), version=1)
        assert e.weight_version == 1 and e.get_server_weight_version() == "1"
        after = e.generate(prompts, 1, GREEDY)
        assert [s.token_ids for s in after] == [s.token_ids for s in before]
    finally:
        e.shutdown()
