"""Live megatron shards -> an HF checkpoint directory, streamed: each full tensor is assembled
on rank 0 and written straight into its safetensors shard, so the writer holds one tensor at a
time (never the model) and no GPU holds more than one assembled tensor. Used by the trainer's
periodic and final exports and by `bench memory`."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from eureka_megatron.convert.hf_io import ShardedSafetensorsWriter, copy_side_files
from eureka_megatron.models.mapping import Mapping
from eureka_megatron.rollout.weight_export import export_hf_weights, export_plan


def write_hf(chunks: list[torch.nn.Module], mapping: Mapping, out_dir: str | Path,
             side_dir: str | Path) -> None:
    """Collective: `chunks`' weights as an HF checkpoint in `out_dir`, with `side_dir`'s config,
    tokenizer and processor files; written beside it and renamed into place (atomic)."""
    out_dir = Path(out_dir)
    rank0 = torch.distributed.get_rank() == 0
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    plan = export_plan(chunks, mapping)
    writer = None
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        copy_side_files(Path(side_dir), tmp)
        writer = ShardedSafetensorsWriter(tmp, plan)
    for name, t in export_hf_weights(chunks, mapping, dest="rank0"):
        if writer is not None:
            writer.add(name, t)
    if rank0:
        writer.finish()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    torch.distributed.barrier()
