"""Weight export: HF-named full tensors streamed out of a live Megatron model at any TP/PP/DP.

The same `Mapping.iter_hf` stream the `convert megatron-to-hf` command reads from torch_dist files
runs here on the training shards: one mapping, two sources. Each megatron global tensor (checkpoint
key + layer) is assembled from the shards megatron's own `sharded_state_dict` describes -- TP
slices (including the split SwiGLU [gate; up] halves), the pipeline stage that owns it (PP), one
replica only (DP, tied embeddings) -- then turned into HF tensors by the mapping: QKV and gate/up
un-fused, vocab and MLP/head padding removed, dtype kept.

Assembly is collective and uses collectives: a TP-sharded tensor is put together by one TP
all-gather over the tensor-parallel group that holds it (NCCL's bandwidth-optimal ring on GPUs,
not one point-to-point copy per piece), then, if the destination is elsewhere (another pipeline
stage), sent there whole. Destinations: global rank 0 (`"rank0"`: HF engines, checkpoint
writers), every rank (`"all"`), or each pipeline stage's sender -- the rank at TP 0 / DP 0 of the
stage -- for that stage's own tensors (`"stage"`: the disaggregated sync, `weight_broadcast.py`).

Every rank must iterate the export in lockstep; ranks that are not a destination get nothing.
One global tensor is in flight at a time, so peak extra memory is the largest tensor (the
embedding), not the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from eureka_megatron.models.init import iter_leaves
from eureka_megatron.models.mapping import Mapping, MegatronKey

DESTINATIONS = ("rank0", "all", "stage")
# torch >= 2.13 renamed all_gather_into_tensor (same collective)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

Piece = tuple[tuple[int, ...], tuple[int, ...]]  # (offset inside the layer-less global tensor, shape)


@dataclass(frozen=True)
class _Rank:
    """Where a rank sits in megatron's layout."""
    stage: int                 # pipeline rank
    sender: bool               # TP rank 0 and DP rank 0: its stage's sender
    tp_group: tuple[int, ...]  # global ranks of its TP group, in TP order


@dataclass(frozen=True)
class _Global:
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: dict[int, tuple[Piece, ...]]  # holding rank -> its pieces, in its local order
    holders: tuple[int, ...]              # one rank, or a whole TP group in TP order
    stage: int


@dataclass(frozen=True)
class _Plan:
    tensors: dict[MegatronKey, _Global]
    senders: tuple[int, ...]  # global rank of each pipeline stage's sender


@dataclass(frozen=True)
class StagePlan:
    """Per pipeline stage, its sender's rank and the (HF name, shape, dtype) it exports, in order."""
    senders: tuple[int, ...]
    tensors: tuple[tuple[tuple[str, tuple[int, ...], torch.dtype], ...], ...]


def _local_shards(chunks) -> dict[MegatronKey, list[tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]]]:
    """This rank's main-replica shards: megatron key -> [(offset, global shape, data)]."""
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


def _my_rank() -> _Rank:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_group()
    return _Rank(ps.get_pipeline_model_parallel_rank(),
                 ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0,
                 tuple(dist.get_global_rank(tp, i) for i in range(dist.get_world_size(tp))))


def _plan(local, group) -> _Plan:
    """Which rank holds which slices of every global tensor, and where every rank sits (one
    all_gather_object); checked the same way on every rank, so a bad layout fails everywhere."""
    table = {k: [(off, gshape, tuple(d.shape), d.dtype) for off, gshape, d in v]
             for k, v in local.items()}
    tables = [None] * dist.get_world_size(group)
    dist.all_gather_object(tables, (dist.get_rank(), _my_rank(), table), group=group)
    ranks = {rank: where for rank, where, _ in tables}
    pieces: dict[MegatronKey, dict[int, list[Piece]]] = {}
    meta: dict[MegatronKey, tuple] = {}
    for rank, _, t in tables:
        for key, entries in t.items():
            for off, gshape, shape, dtype in entries:
                pieces.setdefault(key, {}).setdefault(rank, []).append((off, shape))
                if meta.setdefault(key, (gshape, dtype)) != (gshape, dtype):
                    raise RuntimeError(f"{key}: ranks disagree on its global shape / dtype: "
                                       f"{meta[key]} vs {(gshape, dtype)}")
    plan = {}
    for key, by_rank in pieces.items():
        gshape, dtype = meta[key]
        covered = sum(torch.Size(s).numel() for ps in by_rank.values() for _, s in ps)
        if covered != torch.Size(gshape).numel():
            raise RuntimeError(f"{key}: shards cover {covered} of {torch.Size(gshape).numel()} "
                               "elements (overlapping or missing replicas)")
        holders = tuple(sorted(by_rank))
        if len(holders) > 1:
            tp_group = ranks[holders[0]].tp_group
            sizes = {sum(torch.Size(s).numel() for _, s in by_rank[r]) for r in holders}
            if sorted(tp_group) != list(holders) or len(sizes) != 1:
                raise RuntimeError(f"{key}: held by ranks {list(holders)}, not in equal parts by "
                                   f"one tensor-parallel group ({list(tp_group)})")
            holders = tp_group
        plan[key] = _Global(tuple(gshape), dtype, {r: tuple(p) for r, p in by_rank.items()},
                            holders, ranks[holders[0]].stage)
    stages = 1 + max(where.stage for where in ranks.values())
    senders = tuple(min(r for r, w in ranks.items() if w.stage == s and w.sender)
                    for s in range(stages))
    return _Plan(plan, senders)


def _row_blocks(g: _Global) -> bool:
    """Each TP rank holds one block of rows, in TP order: an all-gather fills the tensor as is."""
    rows, zeros = g.shape[0] // len(g.holders), (0,) * (len(g.shape) - 1)
    return all(g.pieces[r] == (((i * rows, *zeros), (rows, *g.shape[1:])),)
               for i, r in enumerate(g.holders))


def _index(offset, shape) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


class _Assembler:
    """Builds one global tensor at a time on its destination rank(s); `receives` says whether
    the tensor it just returned is real here (elsewhere it is a meta tensor of the same shape)."""

    def __init__(self, chunks, dest: str, group):
        if dest not in DESTINATIONS:
            raise ValueError(f"dest must be one of {DESTINATIONS}, got {dest!r}")
        self.dest, self.group = dest, group
        self.me = dist.get_rank()
        self.root = dist.get_global_rank(group, 0) if group is not None else 0
        self.local = _local_shards(chunks)
        self.plan = _plan(self.local, group)
        self.receives = False

    def __call__(self, key: MegatronKey) -> torch.Tensor:
        if key not in self.plan.tensors:
            raise KeyError(f"the model has no tensor {key[0]}{list(key[1])} (the mapping and the "
                           "model disagree: wrong family config or layout?)")
        g = self.plan.tensors[key]
        full = None
        if self.me in g.pieces:
            full = self._local(key, g) if len(g.holders) == 1 else self._all_gather(key, g)
        receiver = self.plan.senders[g.stage] if self.dest == "stage" else self.root
        if receiver not in g.holders:  # another pipeline stage: the whole tensor, sent once
            if self.me == g.holders[0]:
                dist.send(full.contiguous(), dst=receiver)
            elif self.me == receiver:
                full = torch.empty(g.shape, dtype=g.dtype, device=self._device())
                dist.recv(full, src=g.holders[0])
        if self.dest == "all":
            if self.me != self.root:
                full = torch.empty(g.shape, dtype=g.dtype, device=self._device())
            dist.broadcast(full, src=self.root, group=self.group)
        self.receives = self.dest == "all" or self.me == receiver
        return full if self.receives else torch.empty(g.shape, dtype=g.dtype, device="meta")

    def _local(self, key, g: _Global) -> torch.Tensor:
        """All pieces are on this rank. A single whole piece is returned as a view of the live
        parameter (consumers copy it; engines never keep references)."""
        mine = self.local[key]
        if len(mine) == 1 and mine[0][2].shape == g.shape:
            return mine[0][2].detach()
        full = torch.empty(g.shape, dtype=g.dtype, device=self._device())
        for off, _, data in mine:
            full[_index(off, data.shape)] = data
        return full

    def _all_gather(self, key, g: _Global) -> torch.Tensor:
        """One all-gather over the TP group of this rank's pieces (flattened, in local order);
        row blocks in TP order are gathered straight into the assembled tensor."""
        from megatron.core import parallel_state as ps

        group = ps.get_tensor_model_parallel_group()
        mine = self.local[key]
        full = torch.empty(g.shape, dtype=g.dtype, device=self._device())
        local = torch.cat([d.detach().reshape(-1) for _, _, d in mine])
        if _row_blocks(g):
            _all_gather_single(full.view(-1), local, group=group)
            return full
        n = local.numel()
        gathered = torch.empty(n * len(g.holders), dtype=g.dtype, device=local.device)
        _all_gather_single(gathered, local, group=group)
        for i, r in enumerate(g.holders):
            pos = i * n
            for off, shape in g.pieces[r]:
                size = torch.Size(shape).numel()
                full[_index(off, shape)] = gathered[pos:pos + size].view(shape)
                pos += size
        return full

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")


def export_hf_weights(chunks: list[torch.nn.Module], mapping: Mapping, *, dest: str = "rank0",
                      group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) in the mapping's order, on global rank 0 (`dest="rank0"`), on
    every rank (`"all"`: what colocated engines with their own GPUs need), or on each pipeline
    stage's sender for its stage's tensors (`"stage"`). Every rank of `group` (default: the
    world) must consume the iterator to the end, in step."""
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
    _, entries = _meta_pass(chunks, mapping, group)
    return [(name, shape, dtype) for name, shape, dtype, _ in entries]


def stage_plan(chunks: list[torch.nn.Module], mapping: Mapping, *, group=None) -> StagePlan:
    """Collective: per pipeline stage, its sender and what `export_hf_weights(dest="stage")`
    yields there, in order -- every rank learns every stage's stream from the global shapes."""
    plan, entries = _meta_pass(chunks, mapping, group)
    return StagePlan(plan.senders, tuple(
        tuple((name, shape, dtype) for name, shape, dtype, s in entries if s == stage)
        for stage in range(len(plan.senders))))


def _meta_pass(chunks, mapping: Mapping, group) -> tuple[_Plan, list]:
    """The plan and the export's (HF name, shape, dtype, stage) in order, on meta tensors."""
    plan = _plan(_local_shards(chunks), group)
    stage = [0]

    def meta(key: MegatronKey) -> torch.Tensor:
        g = plan.tensors[key]
        stage[0] = g.stage  # iter_hf yields a key's HF tensors right after asking for it
        return torch.empty(g.shape, dtype=g.dtype, device="meta")

    return plan, [(name, tuple(t.shape), t.dtype, stage[0]) for name, t in mapping.iter_hf(meta)]
