"""HF processor outputs -> megatron micro-batch inputs, the parts every family shares: positions
that count real tokens under left padding, and the causal + padding attention mask."""
from __future__ import annotations

import torch

from eureka_megatron.models.packing import packed_position_ids


def text_prepare(cfg, inputs: dict) -> dict:
    """Positions: 0.. per row; under left padding they count real tokens only; in a packed row
    (`cu_seqlens`) they restart at every sequence."""
    ids = inputs["input_ids"]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    if inputs.get("cu_seqlens") is not None:
        pos = packed_position_ids(inputs["cu_seqlens"], ids.shape[1])[None]
    elif inputs.get("attention_mask") is not None:
        pos = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": inputs.get("attention_mask")}


def padding_mask(attention_mask):
    """HF [B, S] keep-mask -> megatron [B, 1, S, S] causal + padding mask (True = masked)."""
    if attention_mask is None:
        return None
    s = attention_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).triu(1)
    pad = ~attention_mask.bool()[:, None, None, :]
    return causal[None, None] | pad


def packed_params(mb: dict):
    """megatron's THD params of a packed micro-batch (`cu_seqlens`, `max_seqlen`), else None."""
    if mb.get("cu_seqlens") is None:
        return None
    from eureka_megatron.models.packed_attention import packed_seq_params  # megatron

    return packed_seq_params(mb["cu_seqlens"], mb.get("max_seqlen"))


def text_call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=padding_mask(mb["attention_mask"]),
                 packed_seq_params=packed_params(mb))
