"""Sequence packing for the train step: several prompt+response sequences share one row.

RL batches have very uneven lengths (a 300-token prompt with a 40-token answer next to one with
a 2k-token chain of thought); padding every row to the longest wastes most of the compute.
Packing puts sequences end to end in rows of at most `max_tokens`, with `cu_seqlens` marking
the boundaries (megatron's THD layout) and a block-diagonal causal mask so no token attends
across a boundary. Positions restart at 0 for every sequence (for Qwen2.5-VL:
`models.qwen2_5_vl.mrope_position_ids(..., cu_seqlens=...)`), which makes a packed row compute
exactly what each sequence would compute alone.
"""
from __future__ import annotations

import torch

__all__ = ["pack_sequences", "cu_seqlens", "packed_causal_mask", "pack_rows", "packed_position_ids",
           "rows_from_packed", "as_rows"]


def pack_sequences(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Bins of sequence indices, first-fit decreasing: each bin's total <= max_tokens, except
    that a sequence longer than max_tokens gets a bin of its own. Indices within a bin are
    ascending; bins are in the order they were opened. Deterministic (ties by index)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if any(n < 1 for n in lengths):
        raise ValueError(f"every sequence needs at least one token, got lengths {lengths}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max(max_tokens - n, 0))  # an oversized sequence leaves no room
    return [sorted(b) for b in bins]


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    """Cumulative boundaries [0, l0, l0+l1, ...] as int64."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.long)
    out[1:] = torch.cumsum(torch.as_tensor(lengths, dtype=torch.long), 0)
    return out


def packed_causal_mask(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """bool [1, 1, S, S], True = masked (megatron's convention): causal inside each sequence,
    nothing across sequences; positions after the last sequence (padding) see only themselves,
    so no softmax row is empty and no real token sees padding."""
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] > total_len or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens {bounds} is not increasing from 0 to at most {total_len}")
    seg = torch.full((total_len,), -1, dtype=torch.long, device=cu_seqlens.device)  # -1: padding
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    seg[:bounds[-1]] = torch.repeat_interleave(torch.arange(len(lengths), device=seg.device), lengths)
    pos = torch.arange(total_len, device=seg.device)
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]) & (seg[:, None] >= 0)
    allowed |= torch.eye(total_len, dtype=torch.bool, device=seg.device)
    return ~allowed[None, None]


def packed_position_ids(cu_seqlens: torch.Tensor, total_len: int) -> torch.Tensor:
    """[total_len] positions restarting at 0 for each sequence; padding gets 0."""
    pos = torch.zeros(total_len, dtype=torch.long)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        pos[a:b] = torch.arange(b - a)
    return pos


def pack_rows(seqs: list[list[int]], bins: list[list[int]], *, pad_id: int = 0,
              pad_to_multiple: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(input_ids [n_bins, S_max] long, cu_seqlens of each bin). Sequences of a bin are laid out
    in the bin's order; every row is right-padded with pad_id to S_max (the longest bin,
    rounded up to pad_to_multiple, e.g. the TP size for sequence parallelism)."""
    if pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple must be >= 1, got {pad_to_multiple}")
    used = [i for b in bins for i in b]
    if sorted(used) != list(range(len(seqs))):
        raise ValueError("bins must use every sequence index exactly once")
    totals = [sum(len(seqs[i]) for i in b) for b in bins]
    width = max(totals, default=0)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    cus = []
    for r, b in enumerate(bins):
        row = [t for i in b for t in seqs[i]]
        ids[r, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        cus.append(cu_seqlens([len(seqs[i]) for i in b]))
    return ids, cus


def rows_from_packed(packed: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token values of a packed row [1, T] (or [T]) laid out per sequence, [B, S]: row b,
    column s holds `packed[index[b, s]]` where `valid`, else 0. Differentiable (a gather; its
    backward adds each packed token's gradient once), so losses computed on the rows train
    the packed forward."""
    flat = packed.reshape(-1)
    taken = flat.index_select(0, index.reshape(-1).to(flat.device)).view(index.shape)
    return torch.where(valid.to(taken.device), taken, torch.zeros((), dtype=taken.dtype,
                                                                  device=taken.device))


def as_rows(values: torch.Tensor, mb: dict) -> torch.Tensor:
    """Per-token values of a micro-batch's model layout, one row per sequence [B, S]: a packed
    micro-batch's [1, T] values unpacked through its `packed_index` / `packed_valid`; a padded
    micro-batch's are already rows."""
    if mb.get("packed_index") is None:
        return values
    return rows_from_packed(values, mb["packed_index"], mb["packed_valid"])
