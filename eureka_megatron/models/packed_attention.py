"""Packed sequences (megatron's THD layout) through megatron's model code on both stacks.

A packed micro-batch is one row of several sequences end to end, with `cu_seqlens` marking
where each starts. Megatron takes it as `PackedSeqParams(qkv_format="thd")`: the rotary
embedding restarts per sequence and Transformer Engine's attention (GPU) keeps each sequence to
itself. megatron's local `DotProductAttention` (CPU) refuses packed params, so the local layer
spec uses `PackedDotProductAttention`: the same unfused attention, each sequence attending
causally to itself only -- what it would compute alone.
"""
from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention


def packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> PackedSeqParams:
    """THD params of one packed row whose sequences end at `cu_seqlens` [n + 1] (the last entry
    is the row's length: a padded tail counts as one more sequence)."""
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=int(max_seqlen), max_seqlen_kv=int(max_seqlen))


class PackedDotProductAttention(DotProductAttention):
    """megatron's unfused attention, also for THD-packed q/k/v [T, heads, dim]: the packed
    sequences are laid out as a batch of right-padded rows, attended causally, and packed again
    -- what each sequence computes alone, at the cost of the padded batch (a block-diagonal
    mask over the whole row would cost T^2)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PackedSeqParams | None = None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences must be in THD format, got "
                             f"{packed_seq_params.qkv_format!r}")
        index, valid = sequence_rows(packed_seq_params.cu_seqlens_q, query.device)
        width = index.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=query.device).triu(1)

        def rows(t):  # [T, heads, dim] -> [width, sequences, heads, dim]
            return t[index].transpose(0, 1)

        out = super().forward(rows(query), rows(key), rows(value), causal[None, None],
                              attn_mask_type, attention_bias)  # [width, sequences, heads * dim]
        return out.transpose(0, 1)[valid][:, None]  # [T, 1, heads * dim], in packed order


def sequence_rows(cu_seqlens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [sequences, longest], valid): the packed position of each sequence's tokens,
    right-padded (padding points at position 0 and is not valid)."""
    bounds = cu_seqlens.tolist()
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])], device=device)
    cols = torch.arange(int(lengths.max()), device=device)
    valid = cols[None] < lengths[:, None]
    starts = torch.tensor(bounds[:-1], device=device)
    return torch.where(valid, starts[:, None] + cols[None], 0), valid
