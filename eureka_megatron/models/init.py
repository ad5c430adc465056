"""Layout-invariant initialisation: the same seed gives the same global weights at any TP/PP/VPP.

megatron's own init is TP-invariant with CPU initialisation but not PP-invariant (each stage
draws from its own RNG stream). Here each global tensor is drawn from a generator seeded by its
checkpoint key (and layer index), then this rank keeps its slice -- so a TP2xPP2 model starts
bit-identical to the TP1 model, which is what the parallel-invariance tests and benchmarks need.
Only matrices are re-drawn; norms and biases keep megatron's deterministic ones/zeros.
"""
from __future__ import annotations

import zlib

import torch


def layout_invariant_init(chunks: list[torch.nn.Module], seed: int, std: float) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    with torch.no_grad():
        for chunk in chunks:
            sd = chunk.sharded_state_dict()
            apply_factories(sd)
            for sh in _iter_values(sd):
                if not isinstance(sh, ShardedTensor) or sh.data.ndim < 2:
                    continue
                pre = sh.prepend_axis_num
                tag = f"{sh.key}|{tuple(sh.global_offset[:pre])}|{seed}"
                gen = torch.Generator().manual_seed(zlib.crc32(tag.encode()))
                full = torch.empty(sh.global_shape[pre:], dtype=torch.float32)
                full.normal_(0.0, std, generator=gen)
                index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.data.shape))
                sh.data.copy_(full[index])


def _iter_values(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _iter_values(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _iter_values(v)
    else:
        yield tree
