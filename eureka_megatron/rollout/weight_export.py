"""Weight export: HF-named full tensors streamed out of a live Megatron model at any TP/PP/DP.

The same `Mapping.iter_hf` stream the `convert megatron-to-hf` command reads from torch_dist files
runs here on the training shards: one mapping, two sources. Each megatron global tensor (checkpoint
key + layer) is assembled where it is needed from the shards megatron's own `sharded_state_dict`
describes -- TP slices (including the split SwiGLU [gate; up] halves), the pipeline stage that owns
it (PP), one replica only (DP, tied embeddings) -- then turned into HF tensors by the mapping:
QKV and gate/up un-fused, vocab and MLP/head padding removed, dtype kept.

Every rank must iterate the export in lockstep (the assembly is collective); ranks that are not a
destination get nothing. One global tensor is in flight at a time, so peak extra memory is the
largest tensor (the embedding), not the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from eureka_megatron.models.init import iter_leaves
from eureka_megatron.models.mapping import Mapping, MegatronKey


@dataclass(frozen=True)
class _Piece:
    rank: int
    offset: tuple[int, ...]   # offset inside the (layer-less) global tensor
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Global:
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[_Piece, ...]


def _local_shards(chunks) -> dict[MegatronKey, list[tuple[tuple[int, ...], torch.Tensor]]]:
    """This rank's main-replica shards: megatron key -> [(offset, data)], plus global shapes."""
    from megatron.core.dist_checkpointing.mapping import (ShardedTensor, apply_factories,
                                                          is_main_replica)

    out: dict = {}
    for chunk in chunks:
        sd = chunk.sharded_state_dict()
        apply_factories(sd)
        for sh in iter_leaves(sd):
            if not isinstance(sh, ShardedTensor) or not is_main_replica(sh.replica_id):
                continue
            pre = sh.prepend_axis_num
            key = (sh.key, tuple(sh.global_offset[:pre]))
            out.setdefault(key, []).append(
                (tuple(sh.global_offset[pre:]), tuple(sh.global_shape[pre:]), sh.data))
    return out


def _plan(local, group) -> dict[MegatronKey, _Global]:
    """Which rank holds which slice of every global tensor (one all_gather_object)."""
    me = dist.get_rank()
    table = {k: [(off, gshape, tuple(d.shape), d.dtype) for off, gshape, d in v]
             for k, v in local.items()}
    tables = [None] * dist.get_world_size(group)
    dist.all_gather_object(tables, (me, table), group=group)
    plan: dict[MegatronKey, _Global] = {}
    pieces: dict[MegatronKey, list[_Piece]] = {}
    meta: dict[MegatronKey, tuple] = {}
    for rank, t in tables:
        for key, entries in t.items():
            for off, gshape, shape, dtype in entries:
                pieces.setdefault(key, []).append(_Piece(rank, off, shape))
                if meta.setdefault(key, (gshape, dtype)) != (gshape, dtype):
                    raise RuntimeError(f"{key}: ranks disagree on its global shape / dtype: "
                                       f"{meta[key]} vs {(gshape, dtype)}")
    for key, ps in pieces.items():
        ps.sort(key=lambda p: (p.offset, p.rank))
        gshape, dtype = meta[key]
        covered = sum(torch.Size(p.shape).numel() for p in ps)
        if covered != torch.Size(gshape).numel():
            raise RuntimeError(f"{key}: shards cover {covered} of {torch.Size(gshape).numel()} "
                               "elements (overlapping or missing replicas)")
        plan[key] = _Global(tuple(gshape), dtype, tuple(ps))
    return plan


class _Assembler:
    """Builds one global tensor at a time on the destination rank(s) by point-to-point copies."""

    def __init__(self, chunks, dest: str, group):
        if dest not in ("rank0", "all"):
            raise ValueError(f"dest must be 'rank0' or 'all', got {dest!r}")
        self.dest, self.group = dest, group
        self.me = dist.get_rank()
        self.root = dist.get_global_rank(group, 0) if group is not None else 0
        self.local = _local_shards(chunks)
        self.plan = _plan(self.local, group)
        self.receives = self.me == self.root or dest == "all"
        self.bytes = 0

    def __call__(self, key: MegatronKey) -> torch.Tensor:
        if key not in self.plan:
            raise KeyError(f"the model has no tensor {key[0]}{list(key[1])} (the mapping and the "
                           "model disagree: wrong family config or layout?)")
        g = self.plan[key]
        mine = iter(self.local.get(key, []))
        whole_on_root = len(g.pieces) == 1 and g.pieces[0].rank == self.root
        if whole_on_root and self.me == self.root:
            # No assembly: the root's own shard is the whole tensor (TP1 or TP-replicated). It is
            # a view of the live parameter; consumers copy it (engines never keep references).
            full = next(mine)[2].detach()
            pieces = ()
        else:
            full = (torch.empty(g.shape, dtype=g.dtype, device=self._device())
                    if self.me == self.root else None)
            pieces = g.pieces
        for p in pieces:
            index = tuple(slice(o, o + n) for o, n in zip(p.offset, p.shape))
            if p.rank == self.me:
                _, _, data = next(mine)
                if full is not None:
                    full[index] = data
                else:
                    dist.send(data.detach().contiguous(), dst=self.root, group=None)
            elif full is not None:
                target = full[index]
                if target.is_contiguous():  # a row block (TP on dim 0): straight into place
                    dist.recv(target, src=p.rank)
                else:
                    buf = torch.empty(p.shape, dtype=g.dtype, device=full.device)
                    dist.recv(buf, src=p.rank)
                    target.copy_(buf)
        if self.dest == "all":
            if full is None:
                full = torch.empty(g.shape, dtype=g.dtype, device=self._device())
            dist.broadcast(full, src=self.root, group=self.group)
        if full is None:
            return torch.empty(g.shape, dtype=g.dtype, device="meta")
        self.bytes += full.numel() * full.element_size()
        return full

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")


def export_hf_weights(chunks: list[torch.nn.Module], mapping: Mapping, *, dest: str = "rank0",
                      group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in the mapping's order, on global rank 0 (`dest="rank0"`) or on
    every rank (`"all"`: what colocated engines with their own GPUs need). Every rank of `group`
    (default: the world) must consume the iterator to the end, in step."""
    with torch.no_grad():
        assemble = _Assembler(chunks, dest, group)
        for name, tensor in mapping.iter_hf(assemble):
            if assemble.receives:
                yield name, tensor


def export_plan(chunks: list[torch.nn.Module], mapping: Mapping, *,
                group=None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Collective: every (HF name, shape, dtype) that `export_hf_weights` yields, in its order,
    from the global shapes alone (a meta-tensor pass; nothing is gathered) -- what a writer that
    streams tensors straight to disk needs up front."""
    plan = _plan(_local_shards(chunks), group)

    def meta(key: MegatronKey) -> torch.Tensor:
        return torch.empty(plan[key].shape, dtype=plan[key].dtype, device="meta")

    return [(name, tuple(t.shape), t.dtype) for name, t in mapping.iter_hf(meta)]
