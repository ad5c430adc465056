"""The two converters: HF directory -> megatron torch_dist directory, and back.

Both stream one tensor at a time (peak memory about one memory-mapped shard plus one layer) and
refuse to write anything until every name and shape has been checked:
  * every HF tensor is consumed by the mapping and every mapped name exists (lists the rest);
  * every megatron tensor the model expects is produced, with the shape the model expects --
    the expectation comes from the model itself, built on the meta device (`model_skeleton`),
    so a config that does not match the weights is caught before any data is read.
Output goes to a temporary sibling directory renamed into place at the end: a failure or a kill
leaves no half-written checkpoint.

A converted megatron directory holds the torch_dist checkpoint, `hf/` (the source's config,
tokenizer, processor and chat-template files, used to convert back and by `forward`) and
`conversion.json` (family, source layout, dtype).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eureka_megatron.config import ParallelConfig
from eureka_megatron.convert.hf_io import (HFCheckpoint, HFCheckpointError, ShardedSafetensorsWriter,
                                           copy_side_files)
from eureka_megatron.convert.torch_dist import TorchDistReader, TorchDistWriter
from eureka_megatron.errors import OutputExistsError
from eureka_megatron.models.init import iter_leaves
from eureka_megatron.models.mapping import MappingError
from eureka_megatron.models.family import Family
from eureka_megatron.models.registry import FAMILIES, family_for
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.runtime.launcher import launch

CONVERSION = "conversion.json"
HF_SIDE_DIR = "hf"
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


@dataclass
class Skeleton:
    """What a model's torch_dist checkpoint holds: tensors (key -> (global shape incl. layer
    axes, number of layer axes)) and megatron ShardedObjects (unique key -> data)."""

    tensors: dict[str, tuple[tuple[int, ...], int]]
    objects: dict[str, object]


def _skeleton_rank(family_name: str, cfg) -> Skeleton:
    """Rank function: build the model on the meta device at TP1/PP1 and list its checkpoint."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    fam = next(f for f in FAMILIES if f.name == family_name)
    par = ParallelConfig()
    init_distributed(par)
    with torch.device("meta"):
        chunks = fam.build_chunks(cfg, par)
    tensors, objects = {}, {}
    for chunk in chunks:
        sd = chunk.sharded_state_dict()
        apply_factories(sd)
        for v in iter_leaves(sd):
            if isinstance(v, ShardedTensor):
                tensors[v.key] = (tuple(v.global_shape), v.prepend_axis_num)
            elif isinstance(v, ShardedObject):
                objects[v.unique_key] = v.data
    return Skeleton(tensors, objects)


def model_skeleton(fam: Family, cfg) -> Skeleton:
    return launch(_skeleton_rank, 1, fam.name, cfg)[0]


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


def _check_names(mapping, available: set[str], where: str) -> None:
    expected = mapping.hf_names()
    unmapped, missing = available - expected, expected - available
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} tensors in {where} have no mapping: {_listing(unmapped)}")
    if missing:
        problems.append(f"{len(missing)} tensors the mapping needs are not in {where}: "
                        f"{_listing(missing)}")
    if problems:
        raise MappingError("; ".join(problems))


def _check_key_sets(produced: set, present: set, lacking: str, unmapped: str) -> None:
    """Mapped megatron keys vs the keys a model (or checkpoint) has, both ways, listing names."""
    problems = []
    if produced - present:
        problems.append(f"{lacking}: {_listing(produced - present)}")
    if present - produced:
        problems.append(f"{unmapped}: {_listing(present - produced)}")
    if problems:
        raise MappingError("; ".join(problems))


def _megatron_keys(mapping) -> set[str]:
    return {key for _, _, (key, _), _ in mapping.entries()}


def _expected_shape(skeleton: Skeleton, key: str) -> tuple[int, ...]:
    shape, layer_axes = skeleton.tensors[key]
    return shape[layer_axes:]


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                   force: bool = False, progress: bool = True) -> dict:
    """Convert; returns a summary (family, layout, tensors, bytes, seconds)."""
    t0 = time.perf_counter()
    src = HFCheckpoint(hf_dir)
    fam = family_for(src.config, str(Path(hf_dir) / "config.json"))
    cfg = fam.config_from_hf(src.config, src.dir)
    layout = fam.detect_layout(src.names)
    mapping = fam.mapping(cfg, layout)
    cast = _dtype(dtype)

    # -- every check before any byte is written ---------------------------------------------
    _check_names(mapping, src.names, str(hf_dir))
    skeleton = model_skeleton(fam, cfg)
    _check_key_sets(_megatron_keys(mapping), set(skeleton.tensors),
                    "rules produce tensors the model lacks", "the model has tensors no rule produces")
    shapes = {n: src.shape(n) for n in src.names}
    for (key, layer), t in mapping.iter_megatron(lambda n: torch.empty(shapes[n], device="meta")):
        want = _expected_shape(skeleton, key)
        if tuple(t.shape) != want:
            raise MappingError(f"config does not match the weights: {key}{list(layer)} would be "
                               f"{tuple(t.shape)} but the model from config.json expects {want}")

    out = Path(out_dir)
    tmp = _prepare_out(out, force)
    try:
        writer = TorchDistWriter(tmp)
        entries = list(mapping.entries())
        bar = _progress(len(entries), "hf -> megatron", progress)
        for (key, layer), t in mapping.iter_megatron(src.get):
            if cast is not None and t.is_floating_point():
                t = t.to(cast)
            full, axes = skeleton.tensors[key]
            writer.add_chunk(key, full, tuple(layer) + (0,) * (len(full) - axes),
                             t.reshape((1,) * axes + tuple(t.shape)))
            bar.update(1)
        bar.close()
        for unique_key, data in skeleton.objects.items():
            writer.add_object(unique_key, data)
        writer.finish()
        side = copy_side_files(Path(hf_dir), tmp / HF_SIDE_DIR)
        summary = {"family": fam.name, "model_type": src.config.get("model_type"), "layout": layout,
                   "source": str(Path(hf_dir).resolve()),
                   "dtype": str(cast or src.dtype()).replace("torch.", ""),
                   "tensors": len(skeleton.tensors), "hf_tensors": len(src.names),
                   "bytes": writer.bytes_written, "side_files": side,
                   "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / CONVERSION).write_text(json.dumps(summary, indent=1))
        (tmp / "complete.json").write_text(json.dumps({"step": 0, "weights_only": True}))
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def read_conversion(megatron_dir: Path, hf_config_dir: str | Path | None = None):
    """(family, cfg, source layout, hf side dir) of a converted megatron directory."""
    megatron_dir = Path(megatron_dir)
    side = Path(hf_config_dir) if hf_config_dir else megatron_dir / HF_SIDE_DIR
    config_file = side / "config.json"
    if not config_file.is_file():
        raise HFCheckpointError(f"{config_file} is missing: pass --hf-config DIR with the model's "
                                "config.json (and tokenizer files)")
    hf_config = json.loads(config_file.read_text())
    fam = family_for(hf_config, str(config_file))
    info_file = megatron_dir / CONVERSION
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return fam, fam.config_from_hf(hf_config, side), info.get("layout"), side


def _side_layout(fam: Family, side: Path) -> str | None:
    """The naming layout of the HF checkpoint in `side` (a training run's --hf-config is the
    checkpoint it started from), or None when it holds no weights."""
    if not any(side.glob("*.safetensors")):
        return None
    return fam.detect_layout(HFCheckpoint(side).names)


def megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, dtype: str | None = None,
                   layout: str | None = None, hf_config_dir: str | Path | None = None,
                   force: bool = False, progress: bool = True, max_shard_bytes: int = 5 << 30) -> dict:
    """Convert back, in the source's naming layout (or `layout`), with its side files."""
    t0 = time.perf_counter()
    mdir = Path(megatron_dir)
    reader = TorchDistReader(mdir)
    fam, cfg, source_layout, side = read_conversion(mdir, hf_config_dir)
    layout = layout or source_layout or _side_layout(fam, side)
    if layout is None:
        raise MappingError(f"{mdir / CONVERSION} is missing and {side} holds no HF weights to "
                           "read the naming from: pass --layout (the HF naming to write)")
    mapping = fam.mapping(cfg, layout)
    cast = _dtype(dtype)

    produced = _megatron_keys(mapping)
    model_keys = {k for k in reader.tensors if not k.startswith(("optimizer.", "rng_state"))}
    _check_key_sets(produced, model_keys, f"{mdir} lacks tensors the mapping needs",
                    f"{mdir} has tensors no rule maps")
    skeleton = model_skeleton(fam, cfg)
    wrong = [f"{k} {reader.shape(k)} (config.json gives {skeleton.tensors[k][0]})"
             for k in sorted(produced) if reader.shape(k) != skeleton.tensors[k][0]]
    if wrong:
        raise MappingError(f"the config does not match {mdir}: {_listing(wrong, 6)}")

    def meta(mkey):
        return torch.empty(reader.shape(mkey[0])[len(mkey[1]):], device="meta",
                           dtype=cast or reader.dtype(mkey[0]))

    plan = [(n, tuple(t.shape), t.dtype) for n, t in mapping.iter_hf(meta)]
    out = Path(out_dir)
    tmp = _prepare_out(out, force)
    try:
        writer = ShardedSafetensorsWriter(tmp, plan, max_bytes=max_shard_bytes)
        entries = list(mapping.entries())
        bar = _progress(len(entries), "megatron -> hf", progress)

        def read(mkey):
            t = reader.read(*mkey)
            bar.update(1)
            return t

        for name, t in mapping.iter_hf(read):
            writer.add(name, t.to(cast) if cast is not None and t.is_floating_point() else t)
        bar.close()
        writer.finish()
        copy_side_files(side, tmp)
        summary = {"family": fam.name, "layout": layout, "tensors": len(mapping.hf_names()),
                   "bytes": writer.total_bytes, "seconds": round(time.perf_counter() - t0, 2)}
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
