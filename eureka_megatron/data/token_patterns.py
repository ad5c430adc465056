"""Synthetic token sequences for the language-model train step: learnable, deterministic, free.

Each sequence is an arithmetic progression modulo the vocabulary (random start and stride), so
the next token is a function of the previous two and the loss visibly falls within a few dozen
steps. Batch `step` depends only on (seed, step): a resumed run sees exactly the batches the
uninterrupted run would have.
"""
from __future__ import annotations

import torch


def pattern_batch(seed: int, step: int, batch: int, seq_length: int, vocab_size: int) -> dict:
    """The global batch of `step`: input_ids, labels, loss_mask, position_ids; all [batch, seq]."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, vocab_size, (batch, 1), generator=gen)
    stride = torch.randint(1, 8, (batch, 1), generator=gen)
    tokens = (start + stride * torch.arange(seq_length + 1)) % vocab_size
    return {
        "input_ids": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(batch, seq_length),
        "position_ids": torch.arange(seq_length).expand(batch, -1).contiguous(),
    }


def split_batch(batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict]:
    """This DP rank's contiguous share of a global batch, cut into micro-batches."""
    n = batch["input_ids"].shape[0]
    if n % (dp_size * micro_batch_size):
        raise ValueError(f"global batch {n} not divisible by DP {dp_size} x micro-batch {micro_batch_size}")
    per_rank = n // dp_size
    lo = dp_rank * per_rank
    return [
        {k: v[i:i + micro_batch_size] for k, v in batch.items()}
        for i in range(lo, lo + per_rank, micro_batch_size)
    ]
