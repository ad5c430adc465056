"""Serialising weight buckets for SGLang's `serialized_named_tensors` (base64 text).

With sglang installed, its own MultiprocessingSerializer (CUDA tensors travel as IPC handles:
what a real server unpickles, with its metadata class); without it, our pickler, which the fake
test server reads back.
"""
from __future__ import annotations

import base64
import functools
import importlib
import importlib.util
import io
import pickle
from typing import Any

import torch


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


@functools.cache
def _sglang_transport():
    """sglang's MultiprocessingSerializer and FlattenedTensorMetadata, reductions patched."""
    from sglang.srt.utils import MultiprocessingSerializer
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError:  # sglang < 0.5
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata
    for mod in ("sglang.srt.utils.patch_torch", "sglang.srt.patch_torch"):
        try:  # device-UUID-based CUDA IPC rebuild (newer serializers also call it themselves)
            importlib.import_module(mod).monkey_patch_torch_reductions()
            break
        except (ImportError, AttributeError):
            continue
    return MultiprocessingSerializer, FlattenedTensorMetadata


class _Pickler(pickle.Pickler):
    """CUDA tensors go through torch's CUDA-IPC reducer (as with ForkingPickler); CPU tensors are
    pickled by value. ForkingPickler would put CPU tensors in shared memory whose file
    descriptors only processes of the sender's multiprocessing family (same authkey) can
    receive, which a separately launched server is not."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor
            return reduce_tensor(obj)
        return NotImplemented


def serialize_payload(obj: Any, *, use_sglang: bool | None = None) -> str:
    """base64 text of `obj` for `serialized_named_tensors`: sglang's MultiprocessingSerializer
    when sglang is installed (what a real server unpickles), else our `_Pickler`."""
    if use_sglang is None:
        use_sglang = sglang_available()
    if use_sglang:
        return _sglang_transport()[0].serialize(obj, output_str=True)
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deserialize_payload(data: str | bytes) -> Any:
    """Inverse of `serialize_payload` without sglang (what our fake server runs)."""
    if isinstance(data, str):
        data = base64.b64decode(data, validate=True)
    return pickle.loads(data)
