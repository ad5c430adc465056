"""HF processor outputs -> megatron micro-batch inputs, the parts every family shares: positions
that count real tokens under left padding, and the causal + padding attention mask."""
from __future__ import annotations

import torch


def text_prepare(cfg, inputs: dict) -> dict:
    ids = inputs["input_ids"]
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    if "attention_mask" in inputs:  # left padding: positions count real tokens only
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


def text_call(cfg, chunk, mb):
    return chunk(mb["input_ids"], mb["position_ids"], attention_mask=padding_mask(mb["attention_mask"]))
