"""Filling a model's local shards from global tensors, and layout-invariant initialisation.

megatron's sharded state dict says, for every local shard, which global tensor it belongs to
(checkpoint key + layer index) and where it sits in it. `fill_global_tensors` uses that to copy
this rank's slice out of a full tensor produced by a `source` -- the same code serves random
init and loading external weights, at any TP/PP/VPP.

megatron's own init is TP-invariant with CPU initialisation but not PP-invariant (each stage draws
from its own RNG stream). `layout_invariant_init` draws each global matrix from a generator seeded
by its key and layer, so a TP2xPP2 model starts bit-identical to the TP1 model -- what the
parallel-invariance tests and benchmarks need. Norms and biases keep megatron's ones/zeros.
"""
from __future__ import annotations

import zlib
from typing import Callable

import torch

# source(key, layer_offsets, global_shape) -> the full global tensor, or None to leave the shard
Source = Callable[[str, tuple[int, ...], tuple[int, ...]], "torch.Tensor | None"]


def fill_global_tensors(chunks: list[torch.nn.Module], source: Source) -> list[str]:
    """Copy each shard's slice of `source`'s global tensor into it; returns the keys filled."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    filled = []
    with torch.no_grad():
        for chunk in chunks:
            sd = chunk.sharded_state_dict()
            apply_factories(sd)
            for sh in iter_leaves(sd):
                if not isinstance(sh, ShardedTensor):
                    continue
                pre = sh.prepend_axis_num
                full = source(sh.key, tuple(sh.global_offset[:pre]), tuple(sh.global_shape[pre:]))
                if full is None:
                    continue
                if tuple(full.shape) != tuple(sh.global_shape[pre:]):
                    raise ValueError(f"{sh.key}{list(sh.global_offset[:pre])}: source shape "
                                     f"{tuple(full.shape)} != expected {tuple(sh.global_shape[pre:])}")
                index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.data.shape))
                sh.data.copy_(full[index])
                del full  # before the next read: one global tensor alive at a time
                filled.append(sh.key)
    return filled


def layout_invariant_init(chunks: list[torch.nn.Module], seed: int, std: float) -> None:
    def source(key, layer, shape):
        if len(shape) < 2:
            return None
        gen = torch.Generator().manual_seed(zlib.crc32(f"{key}|{layer}|{seed}".encode()))
        return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=gen)

    fill_global_tensors(chunks, source)


def iter_leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from iter_leaves(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from iter_leaves(v)
    else:
        yield tree
