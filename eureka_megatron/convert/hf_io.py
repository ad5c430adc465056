"""HF checkpoint directories: lazy safetensors reading and streaming, sharded writing.

A source is read through its `model.safetensors.index.json` (or a single `model.safetensors`);
tensors are read one at a time with plain file reads (a memory map would keep every touched page
of every shard resident), so conversion memory stays near one layer. Everything else in the directory (config, tokenizer, processor, chat template, remote
code) is carried over verbatim by `copy_side_files`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFCheckpointError(ValueError):
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
    def names(self) -> set[str]:
        return set(self.weight_map)

    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read with plain file reads (no mmap: memory stays at this tensor)."""
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in {self.dir}")
        path = self.dir / self.weight_map[name]
        header, base = self._header(path)
        entry = header[name]
        start, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(base + start)
            blob = bytearray(f.read(end - start))
        if len(blob) != end - start:
            raise HFCheckpointError(f"{path} is truncated (reading {name})")
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise HFCheckpointError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
        if not blob:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(blob, dtype=dtype).reshape(entry["shape"])

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


class ShardedSafetensorsWriter:
    """Write (name, tensor) pairs into `model-0000i-of-0000n.safetensors` shards of at most
    `max_bytes`, holding one shard in memory; `finish()` renames the shards and writes the index."""

    def __init__(self, directory: Path, max_bytes: int = 5 << 30, metadata: dict | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.metadata = metadata or {"format": "pt"}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + n > self.max_bytes:
            self._flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += n
        self.total_bytes += n

    def add_all(self, pairs: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in pairs:
            self.add(name, t)

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"part-{len(self._files):05d}.safetensors"
        save_file(self._buf, str(self.dir / name), metadata=self.metadata)
        self._files.append((name, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def finish(self) -> None:
        if self._buf or not self._files:
            self._flush()
        if len(self._files) == 1:
            (self.dir / self._files[0][0]).rename(self.dir / SINGLE)
            return
        n = len(self._files)
        weight_map = {}
        for i, (tmp, names) in enumerate(self._files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / tmp).rename(self.dir / final)
            weight_map.update({k: final for k in names})
        (self.dir / INDEX).write_text(json.dumps(
            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2))
