"""megatron's torch_dist checkpoint format, read and written by one process, tensor by tensor.

A torch_dist checkpoint is a torch.distributed.checkpoint (DCP) directory: `*.distcp` files holding
`torch.save`d chunks back to back, a pickled `Metadata` (`.metadata`) that gives every key its
global shape and the (offsets, sizes, file, byte range) of each chunk, plus megatron's
`metadata.json` and `common.pt`. Stacked decoder layers are one key with a leading layer axis,
one chunk per layer. megatron loads such a directory at any TP/PP because DCP reads any region
from any chunking.

Writing through DCP itself needs the whole state dict in memory at once; the converters instead
stream: `TorchDistWriter` appends one chunk at a time and writes the metadata at the end, and
`TorchDistReader` reads one layer of one key at a time, assembling it from however many TP
chunks a training run saved.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.filesystem import _StorageInfo

from eureka_megatron.errors import InputNotFoundError, UserError

MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


class TorchDistError(UserError, ValueError):
    """A torch_dist checkpoint whose shards are truncated or do not cover a tensor."""


def _dcp():
    return dcp_metadata, _StorageInfo


class TorchDistWriter:
    """Append chunks to `.distcp` files (rolling over at `file_bytes`); `finish()` writes the
    metadata that makes the directory a checkpoint. Not a checkpoint until then."""

    def __init__(self, directory: str | Path, file_bytes: int = 4 << 30):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_bytes = file_bytes
        self._file_index = -1
        self._f = None
        self._tensors: dict[str, tuple[tuple[int, ...], torch.dtype, list]] = {}
        self._objects: list[str] = []
        self._storage: dict = {}
        self.bytes_written = 0

    def _open_next(self) -> None:
        if self._f is not None:
            self._f.close()
        self._file_index += 1
        self._name = f"__0_{self._file_index}.distcp"
        self._f = open(self.dir / self._name, "wb")

    def _file_for(self, nbytes: int):
        if self._f is None or (self._f.tell() and self._f.tell() + nbytes > self.file_bytes):
            self._open_next()
        return self._f

    def add_chunk(self, key: str, global_shape: tuple[int, ...], offsets: tuple[int, ...],
                  tensor: torch.Tensor) -> None:
        """One chunk of global tensor `key`; `tensor` has the chunk's full rank (layer axis too)."""
        m, StorageInfo = _dcp()
        global_shape = tuple(global_shape)
        if len(offsets) != len(global_shape) or tensor.dim() != len(global_shape):
            raise ValueError(f"{key}: chunk rank {tensor.dim()} / offsets {offsets} do not match "
                             f"the global shape {global_shape}")
        shape, dtype, chunks = self._tensors.setdefault(key, (global_shape, tensor.dtype, []))
        if shape != global_shape or dtype != tensor.dtype:
            raise ValueError(f"{key}: chunks disagree on shape/dtype ({shape}, {dtype}) vs "
                             f"({global_shape}, {tensor.dtype})")
        t = tensor.detach().to("cpu")
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone(memory_format=torch.contiguous_format)  # torch.save writes whole storages
        f = self._file_for(t.numel() * t.element_size())
        off = f.tell()
        torch.save(t, f)  # straight into the file, as DCP's own writer does: no extra copy
        self.bytes_written += f.tell() - off
        chunks.append(m.ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape))
        self._storage[m.MetadataIndex(key, torch.Size(offsets))] = StorageInfo(self._name, off, f.tell() - off)

    def add_object(self, unique_key: str, data) -> None:
        """A megatron ShardedObject (stored as `torch.save([data])`, as megatron does)."""
        m, StorageInfo = _dcp()
        f = self._file_for(0)
        off = f.tell()
        torch.save([data], f)
        self.bytes_written += f.tell() - off
        self._objects.append(unique_key)
        self._storage[m.MetadataIndex(unique_key)] = StorageInfo(self._name, off, f.tell() - off)

    def finish(self, common: dict | None = None) -> None:
        """Write `.metadata`, `metadata.json` and `common.pt`; checks every key is fully covered."""
        m, _ = _dcp()
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
        sd_meta = {}
        for key, (shape, dtype, chunks) in self._tensors.items():
            covered = sum(int(torch.Size(c.sizes).numel()) for c in chunks)
            if covered != int(torch.Size(shape).numel()):
                raise ValueError(f"{key}: chunks cover {covered} of {torch.Size(shape).numel()} elements")
            sd_meta[key] = m.TensorStorageMetadata(
                properties=m.TensorProperties(dtype=dtype), size=torch.Size(shape), chunks=chunks)
        for key in self._objects:
            sd_meta[key] = m.BytesStorageMetadata()
        meta = m.Metadata(state_dict_metadata=sd_meta, storage_data=self._storage)
        with open(self.dir / ".metadata", "wb") as f:
            pickle.dump(meta, f)
        (self.dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))
        torch.save(common or {}, self.dir / "common.pt")


class TorchDistReader:
    """Global tensors of a torch_dist checkpoint, one (key, layer) at a time."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        meta_file = self.dir / ".metadata"
        if not meta_file.is_file():
            raise InputNotFoundError(f"{meta_file} is missing: {self.dir} is not a torch_dist checkpoint")
        with open(meta_file, "rb") as f:
            self.meta = pickle.load(f)
        m, _ = _dcp()
        self.tensors = {k: v for k, v in self.meta.state_dict_metadata.items()
                        if isinstance(v, m.TensorStorageMetadata)}
        self._by_key: dict[str, list] = {}
        for index, info in self.meta.storage_data.items():
            if index.offset is not None:
                self._by_key.setdefault(index.fqn, []).append((tuple(index.offset), info))

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, layer: tuple[int, ...] = ()) -> torch.Tensor:
        """The global tensor `key` (one layer of it when `layer` holds the leading indices)."""
        if key not in self.tensors:
            raise KeyError(f"{key} is not in the checkpoint {self.dir}")
        meta = self.tensors[key]
        p = len(layer)
        out = torch.empty(tuple(meta.size)[p:], dtype=meta.properties.dtype)
        sizes = {tuple(c.offsets): tuple(c.sizes) for c in meta.chunks}
        filled = 0
        for offsets, info in self._by_key.get(key, []):
            size = sizes[offsets]
            if any(not (o <= i < o + n) for o, n, i in zip(offsets[:p], size[:p], layer)):
                continue
            chunk = self._load(info)
            chunk = chunk[tuple(slice(i - o, i - o + 1) for o, i in zip(offsets[:p], layer))]
            chunk = chunk.reshape(size[p:])
            region = tuple(slice(o, o + n) for o, n in zip(offsets[p:], size[p:]))
            out[region] = chunk
            filled += chunk.numel()
        if filled != out.numel():
            raise TorchDistError(f"{self.dir}: chunks of {key}{list(layer)} cover {filled} of "
                                 f"{out.numel()} elements")
        return out

    def _load(self, info) -> torch.Tensor:
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        if len(blob) != info.length:
            raise TorchDistError(f"{self.dir / info.relative_path} is truncated")
        return torch.load(io.BytesIO(blob), weights_only=True)
