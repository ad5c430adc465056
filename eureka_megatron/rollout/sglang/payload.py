"""`serialized_named_tensors` for SGLang's `update_weights_from_tensor`, without patching torch.

A payload is one flattened bucket, `{"flattened_tensor": T, "metadata": [...]}`, pickled and
base64-encoded; the server reads it with `MultiprocessingSerializer.deserialize`, i.e. SGLang's
`SafeUnpickler`, which admits only allow-listed globals (sglang/srt/utils/common.py). So:
- metadata entries are written as SGLang's own class
  `sglang.srt.weight_sync.tensor_bucket.FlattenedTensorMetadata` (by name: sglang need not be
  importable here; our `FlatTensorMeta` has the same fields);
- CPU tensors travel by value (torch's own reduction, `torch._utils._rebuild_tensor_v2` plus
  `torch.storage._load_from_bytes`, which SGLang loads with weights_only): what a server on
  another host, or one in another venv, can read;
- CUDA tensors travel as CUDA-IPC handles, the device named by its UUID and rebuilt by SGLang's
  `sglang.srt.utils.patch_torch._rebuild_cuda_tensor_modified` -- the bytes SGLang's own
  serializer writes after its `monkey_patch_torch_reductions()`. Here nothing is patched:
  the reduction is applied to this pickler alone, so the rest of the trainer process (torch
  multiprocessing, DataLoader workers, Ray) keeps torch's own reductions.
"""
from __future__ import annotations

import base64
import io
import pickle

import torch
from torch.multiprocessing.reductions import reduce_tensor

from eureka_megatron.rollout.buckets import FlatBucket, FlatTensorMeta

SGLANG_METADATA = ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")
SGLANG_CUDA_REBUILD = ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified")
_CUDA_DEVICE_ARG = 6  # storage device in torch's rebuild_cuda_tensor arguments (as SGLang patches)


def _rebuild_cuda_tensor_by_uuid(*args):  # pragma: no cover - stands for SGLANG_CUDA_REBUILD
    raise RuntimeError("written as SGLang's _rebuild_cuda_tensor_modified; never called here")


class _SGLangPickler(pickle._Pickler):
    """The pure-Python pickler (its `save_global` can be told a class's name on the receiving
    side) with SGLang's names for our metadata class and the CUDA-IPC rebuild function."""

    _NAMES = {FlatTensorMeta: SGLANG_METADATA, _rebuild_cuda_tensor_by_uuid: SGLANG_CUDA_REBUILD}

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            _, args = reduce_tensor(obj)
            args = list(args)
            args[_CUDA_DEVICE_ARG] = str(torch.cuda.get_device_properties(
                args[_CUDA_DEVICE_ARG]).uuid)
            return _rebuild_cuda_tensor_by_uuid, tuple(args)
        return NotImplemented

    def save_global(self, obj, name=None):
        target = self._NAMES.get(obj) if isinstance(obj, type) or callable(obj) else None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        self.save(module)
        self.save(qualname)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def serialize_flat_bucket(flat: FlatBucket) -> str:
    """base64 text of one flattened bucket, as SGLang's `serialized_named_tensors` entry."""
    buf = io.BytesIO()
    _SGLangPickler(buf, protocol=4).dump(
        {"flattened_tensor": flat.tensor, "metadata": list(flat.metadata)})
    return base64.b64encode(buf.getvalue()).decode("ascii")
