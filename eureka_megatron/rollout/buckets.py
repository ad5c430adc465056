"""Weight buckets: group HF-named tensors by size and pack each dtype into one flat buffer.

Framework-independent (torch only); shared by the Megatron weight sync and the rollout engines.
A packed bucket is one contiguous 1-D tensor per (dtype, device) plus per-tensor metadata, so a
whole bucket crosses a process boundary as one CUDA-IPC handle (or one pickled buffer) instead
of one per tensor. The layout is SGLang's `load_format="flattened_bucket"` payload
(`sglang.srt.weight_sync.tensor_bucket`): `{"flattened_tensor", "metadata"}` with metadata fields
name / shape / dtype / start_idx / end_idx / numel. Our indices count elements of the buffer's
own dtype; SGLang's reconstruction (`flat[start:end]`, then `.view(dtype)` in the byte-indexed
versions, a no-op here) reads that correctly in both its per-dtype and multi-dtype versions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

NamedTensor = tuple[str, torch.Tensor]

DEFAULT_BUCKET_BYTES = 512 << 20  # slime's default; one bucket = one IPC handle per dtype


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_by_bytes(named_tensors: Iterable[NamedTensor],
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[NamedTensor]]:
    """Consecutive tensors grouped while a bucket stays <= bucket_bytes.

    Lazy (one bucket in memory at a time, which is what bounds the sync's memory); a tensor
    larger than a bucket is a bucket of its own; empty input yields nothing."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[NamedTensor] = []
    size = 0
    for name, t in named_tensors:
        n = tensor_nbytes(t)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


@dataclass(frozen=True)
class FlatTensorMeta:
    """Where one tensor sits in a flat buffer (field names are SGLang's FlattenedTensorMetadata)."""
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int  # element offset in the flat buffer
    end_idx: int
    numel: int

    @property
    def offset(self) -> int:
        return self.start_idx


@dataclass
class FlatBucket:
    """One dtype's tensors of a bucket, packed in a freshly allocated 1-D buffer.

    Fresh on purpose: SGLang may still be copying out of the buffer after its HTTP call returns
    (slime PR #1731), so a producer must never refill a buffer it already handed out."""
    tensor: torch.Tensor
    metadata: list[FlatTensorMeta]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.tensor)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metadata]


def flatten_bucket(named: Iterable[NamedTensor]) -> list[FlatBucket]:
    """One FlatBucket per (dtype, device), in order of first appearance, tensors in input order.

    Each buffer is a new allocation (never a view of an input or of an earlier buffer); inputs
    may be non-contiguous or 0-d."""
    groups: dict[tuple[torch.dtype, torch.device], list[NamedTensor]] = {}
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        groups.setdefault((t.dtype, t.device), []).append((name, t))
    out = []
    for (dtype, device), items in groups.items():
        total = sum(t.numel() for _, t in items)
        flat = torch.empty(total, dtype=dtype, device=device)
        metas, pos = [], 0
        for name, t in items:
            n = t.numel()
            flat[pos:pos + n].view(t.shape).copy_(t.detach())
            metas.append(FlatTensorMeta(name, torch.Size(t.shape), dtype, pos, pos + n, n))
            pos += n
        out.append(FlatBucket(flat, metas))
    return out


def unflatten_bucket(flat: FlatBucket | dict) -> list[NamedTensor]:
    """(name, tensor) pairs of a FlatBucket or a flattened_bucket payload dict.

    The tensors are views into the flat buffer (clone to keep them past the buffer's life)."""
    if isinstance(flat, FlatBucket):
        buf, metas = flat.tensor, flat.metadata
    else:
        buf, metas = flat["flattened_tensor"], flat["metadata"]
    out = []
    for m in metas:
        part = buf[m.start_idx:m.end_idx]
        if part.dtype != m.dtype:  # a byte-indexed (multi-dtype) SGLang buffer
            part = part.view(m.dtype)
        out.append((m.name, part.reshape(m.shape)))
    return out
