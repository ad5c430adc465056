"""HF checkpoint directories: lazy safetensors reading and streaming, sharded writing.

A source is read through its `model.safetensors.index.json` (or a single `model.safetensors`);
tensors are read one at a time with plain file reads (a memory map would keep every touched page
of every shard resident), so conversion memory stays near one layer. Everything else in the directory (config, tokenizer, processor, chat template, remote
code) is carried over verbatim by `copy_side_files`.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from eureka_megatron.errors import UserError
from eureka_megatron.models.family import TensorNames

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFCheckpointError(UserError, ValueError):
    """A HF directory that cannot be read; the message names the file."""


class HFCheckpoint:
    """Tensor names -> shard files of one HF directory, read lazily."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise HFCheckpointError(f"HF checkpoint directory does not exist: {self.dir}")
        config = self.dir / "config.json"
        if not config.is_file():
            raise HFCheckpointError(f"{config} is missing")
        try:
            self.config = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise HFCheckpointError(f"{config} is not valid JSON: {e}") from None
        self._headers: dict = {}
        index = self.dir / INDEX
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFCheckpointError(f"{index} has no readable weight_map: {e}") from None
        elif (self.dir / SINGLE).is_file():
            header, _ = self._header(self.dir / SINGLE)
            self.weight_map = {n: SINGLE for n in header if n != "__metadata__"}
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) + sorted(
                p.name for p in self.dir.glob("*.safetensors"))
            raise HFCheckpointError(
                f"{self.dir} has neither {INDEX} nor {SINGLE}"
                + (f" (found {', '.join(found[:5])}; only safetensors checkpoints are read)" if found else ""))
        missing = sorted({f for f in self.weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise HFCheckpointError(f"shards named in {self.dir / INDEX} are missing: {', '.join(missing)}")

    @property
    def names(self) -> TensorNames:
        """The tensor names; their shapes on request (`names.shape(name)`, headers only)."""
        return TensorNames(self.weight_map, self.shape)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads (no mmap: memory stays at this tensor)."""
        path, entry, dtype, start = self._locate(name)
        begin, end = entry["data_offsets"]
        return self._read(path, start, end - begin, name, dtype, entry["shape"])

    def expert(self, name: str, e: int) -> tuple[torch.Tensor, int]:
        """Row `e` of a tensor stacked on dim 0 (expert e of a layer's [E, ...] stack) and how
        many rows it stacks. The row's bytes are contiguous, so only they are read: a rank at
        expert parallelism E reads 1/E of each stacked tensor, not all of it."""
        path, entry, dtype, start = self._locate(name)
        shape = entry["shape"]
        if not shape or not 0 <= e < shape[0]:
            raise HFCheckpointError(f"{path}: {name} {tuple(shape)} has no expert {e} on dim 0")
        row = math.prod(shape[1:]) * dtype.itemsize
        return self._read(path, start + e * row, row, name, dtype, shape[1:]), shape[0]

    def _locate(self, name: str) -> tuple[Path, dict, torch.dtype, int]:
        """(file, header entry, dtype, absolute offset of the tensor's first byte)."""
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in {self.dir}")
        path = self.dir / self.weight_map[name]
        header, base = self._header(path)
        entry = header[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise HFCheckpointError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
        return path, entry, dtype, base + entry["data_offsets"][0]

    @staticmethod
    def _read(path: Path, offset: int, nbytes: int, name: str, dtype: torch.dtype,
              shape) -> torch.Tensor:
        blob = bytearray(nbytes)
        with open(path, "rb") as f:
            f.seek(offset)
            got = f.readinto(blob)
        if got != nbytes:
            raise HFCheckpointError(f"{path} is truncated (reading {name})")
        if not blob:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(blob, dtype=dtype).reshape(shape)

    def num_parameters(self) -> int:
        """Elements over every tensor, read from the headers (nothing is loaded)."""
        return sum(math.prod(self.shape(name)) for name in self.names)

    def shape(self, name: str) -> tuple[int, ...]:
        header, _ = self._header(self.dir / self.weight_map[name])
        return tuple(header[name]["shape"])

    def _header(self, path: Path) -> tuple[dict, int]:
        if path not in self._headers:
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise HFCheckpointError(f"{path} is not a safetensors file")
                n = int.from_bytes(raw, "little")
                try:
                    header = json.loads(f.read(n))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise HFCheckpointError(f"{path} has a corrupt header: {e}") from None
            self._headers[path] = (header, 8 + n)
        return self._headers[path]

    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point tensor (the checkpoint's dtype)."""
        for name in sorted(self.weight_map):
            t = self.get(name)
            if t.is_floating_point():
                return t.dtype
        return torch.float32



_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def side_files(directory: Path) -> list[Path]:
    """Every file but the weights: config, tokenizer, processor, chat template, remote code."""
    weights = {INDEX, SINGLE}
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name not in weights
                  and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth", ".distcp"))
                  and not p.name.startswith("."))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for p in side_files(src):
        shutil.copy2(p, dst / p.name)
        out.append(p.name)
    return out


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class ShardedSafetensorsWriter:
    """Write tensors straight into `model-0000i-of-0000n.safetensors` shards of at most
    `max_bytes` (one `model.safetensors` if it fits), holding one tensor in memory at a time.

    safetensors puts the header first, so the writer takes the `plan` -- every (name, shape,
    dtype) in the order they will be added -- up front, e.g. from a meta-tensor pass of the
    mapping; `add` then checks each tensor against it.
    """

    def __init__(self, directory: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_bytes: int = 5 << 30, metadata: dict | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata or {"format": "pt"}
        groups, size = [[]], 0
        for name, shape, dtype in plan:
            n = torch.Size(shape).numel() * dtype.itemsize
            if groups[-1] and size + n > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype, n))
            size += n
        count = len(groups)
        self._files = [SINGLE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._groups = groups
        self._order = [(g, e) for g, group in enumerate(groups) for e in group]
        self._next = 0
        self._f = None
        self.total_bytes = sum(e[3] for _, e in self._order)

    def _open(self, g: int) -> None:
        if self._f is not None:
            self._f.close()
        header, offset = {"__metadata__": self.metadata}, 0
        for name, shape, dtype, n in self._groups[g]:
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.dir / self._files[g], "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"{name}: more tensors than planned")
        g, (want, shape, dtype, _) = self._order[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (want, shape, dtype):
            raise ValueError(f"expected {want} {shape} {dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if self._next == 0 or self._order[self._next - 1][0] != g:
            self._open(g)
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        if t.numel():
            self._f.write(memoryview(t.view(torch.uint8).numpy()))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} planned tensors were written")
        if self._f is not None:
            self._f.close()
            self._f = None
        if len(self._files) > 1:
            weight_map = {e[0]: self._files[g] for g, e in self._order}
            (self.dir / INDEX).write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
