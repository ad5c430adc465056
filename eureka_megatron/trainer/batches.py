"""Rollout sequences -> the actor's micro-batches: DP shares, token-budget micro-batching, collation.

A `Sequence` is one prompt + one sampled response (the actor adds advantages per step). Micro-batches hold whole
sequences, right-padded to the longest in the micro-batch, with at most `budget` padded tokens
(at least one sequence). The same partition is used for the old/ref log-prob passes and for
training, so the first step's ratio is exactly 1 and its KL exactly 0 (same ops, same shapes).
Labels are the next tokens of the response part (label at position t is token t+1); prompt and
padding positions carry -100 and a zero loss mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class Sequence:
    prompt_ids: list[int]
    response_ids: list[int]
    mm_inputs: dict = field(default_factory=dict)  # the prompt's processor tensors
    rollout_logprobs: list[float] | None = None
    group: int = 0  # index of the prompt's group in the rollout batch
    index: int = -1  # position in the step's sequence list

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def dp_share(seqs: list[Sequence], dp_rank: int, dp: int) -> list[Sequence]:
    """This DP rank's sequences: round-robin over the length-sorted list, so every rank gets a
    similar token count (balanced step time) whatever the order of the groups."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    return [seqs[i] for i in order[dp_rank::dp]]


def token_budget_partition(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups, each with rows * max_len <= budget (or a single sequence)."""
    parts: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i, n in enumerate(lengths):
        w = max(width, n)
        if cur and w * (len(cur) + 1) > budget:
            parts.append(cur)
            cur, w = [], n
        cur.append(i)
        width = w
    if cur:
        parts.append(cur)
    return parts


def collate(seqs: list[Sequence], pad_id: int, image_token_id: int | None = None,
            width_multiple: int = 1) -> dict:
    """Right-padded ids, attention mask, labels, loss mask and rollout log-probs, plus the mm tensors.

    Without `image_token_id` every row carries its own copy of its prompt's images (mm tensors
    concatenated in row order). With it, rows that share a prompt share its images: the tensors
    hold each distinct prompt's images once, `image_index` says which vision-output token fills
    each image-token slot, row by row, and `row_image_grid_thw` is the per-row grid that mrope
    positions need. A GRPO group's n responses then cost one vision-tower pass, not n.
    `width_multiple`: the padded width is a multiple of it (sequence parallelism splits the
    sequence over the TP ranks)."""
    width = -(-max(len(s) for s in seqs) // width_multiple) * width_multiple
    b = len(seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros(b, width, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    rollout_lp = torch.zeros(b, width)
    for i, s in enumerate(seqs):
        row = s.prompt_ids + s.response_ids
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        p, r = len(s.prompt_ids), len(s.response_ids)
        if r:
            labels[i, p - 1:p - 1 + r] = torch.tensor(s.response_ids)
            if s.rollout_logprobs is not None:
                rollout_lp[i, p - 1:p - 1 + r] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
    out = {"input_ids": ids, "attention_mask": attn, "labels": labels,
           "loss_mask": (labels != IGNORE).float(),
           "rollout_logprobs": rollout_lp}
    keys = sorted({k for s in seqs for k in s.mm_inputs})
    if image_token_id is None or not keys:
        for k in keys:
            parts = [s.mm_inputs[k] for s in seqs if k in s.mm_inputs]
            out[k] = torch.cat(parts) if parts else None
        return out
    distinct: dict[int, tuple[int, int]] = {}  # id(mm) -> (first vision token, tokens)
    order, index = [], []
    for s in seqs:
        count = sum(1 for t in s.prompt_ids if t == image_token_id)
        if not s.mm_inputs:
            continue
        key = id(s.mm_inputs)
        if key not in distinct:
            start = sum(c for _, c in distinct.values())
            distinct[key] = (start, count)
            order.append(s.mm_inputs)
        start, c = distinct[key]
        if c != count:
            raise ValueError(f"rows sharing images have {c} and {count} image tokens")
        index.append(torch.arange(start, start + count))
    for k in keys:
        out[k] = torch.cat([mm[k] for mm in order if k in mm])
    out["image_index"] = torch.cat(index)
    if "image_grid_thw" in keys:
        out["row_image_grid_thw"] = torch.cat([s.mm_inputs["image_grid_thw"] for s in seqs
                                               if "image_grid_thw" in s.mm_inputs])
    return out


def micro_batches(seqs: list[Sequence], budget: int, pad_id: int, prepare,
                  image_token_id: int | None = None, width_multiple: int = 1) -> list[dict]:
    """Collated micro-batches of `seqs` (this DP rank's share); `prepare(inputs) -> mb` adds the
    family's model inputs (positions, mm tensors) -- see models.family.Family.prepare.
    `image_token_id`, `width_multiple`: see `collate`."""
    out = []
    for idx in token_budget_partition([len(s) for s in seqs], budget):
        raw = collate([seqs[i] for i in idx], pad_id, image_token_id, width_multiple)
        if "row_image_grid_thw" in raw:  # positions follow each row's images
            mb = prepare({**raw, "image_grid_thw": raw["row_image_grid_thw"]})
            mb["image_grid_thw"] = raw["image_grid_thw"]
        else:
            mb = prepare(raw)
        if "image_index" in raw:
            mb["image_index"] = raw["image_index"]
        for k in ("labels", "loss_mask", "rollout_logprobs"):
            mb[k] = raw[k]
        # Right padding: causal attention alone keeps real tokens from seeing padding, so no
        # [B, 1, S, S] mask is built (positions were derived from the mask above).
        mb["attention_mask"] = None
        out.append(mb)
    return out
