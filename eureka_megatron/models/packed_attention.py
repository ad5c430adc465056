"""Packed sequences (megatron's THD layout) through megatron's model code on both stacks.

A packed micro-batch is one row of several sequences end to end, with `cu_seqlens` marking
where each starts. Megatron takes it as `PackedSeqParams(qkv_format="thd")`: the rotary
embedding restarts per sequence and Transformer Engine's attention (GPU) keeps each sequence to
itself. megatron's local `DotProductAttention` (CPU) refuses packed params, so the local layer
spec uses `PackedDotProductAttention`: the same unfused attention under a block-diagonal causal
mask built from `cu_seqlens`, which computes what each sequence would compute alone.
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from eureka_megatron.models.packing import packed_causal_mask


def packed_seq_params(cu_seqlens: torch.Tensor | None, max_seqlen: int | None = None
                      ) -> PackedSeqParams | None:
    """THD params of one packed row whose sequences end at `cu_seqlens` [n + 1] (the last entry
    is the row's length: a padded tail counts as one more sequence); None when not packed."""
    if cu_seqlens is None:
        return None
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


class PackedDotProductAttention(DotProductAttention):
    """megatron's unfused attention, also for THD-packed q/k/v [T, heads, dim]: the packed row
    is attended as a batch of one under a block-diagonal causal mask."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must be in THD format, got "
                             f"{packed_seq_params.qkv_format!r}")
        mask = packed_causal_mask(packed_seq_params.cu_seqlens_q.long(), query.shape[0])
        out = super().forward(query[:, None], key[:, None], value[:, None], mask.to(query.device),
                              attn_mask_type, attention_bias)
        return out  # [T, 1, heads * dim]: the attention reshapes THD output the same way
