"""Rollout sequences -> the actor's micro-batches: DP shares, token-budget micro-batching, collation.

A `Sequence` is one prompt + one sampled response (the actor adds advantages per step).
Micro-batches hold whole sequences, in one of two layouts:
- packed (the default, `train.sequence_packing`): the sequences end to end in one row [1, T]
  with `cu_seqlens` (megatron's THD layout), at most `budget` real tokens per micro-batch
  (first-fit decreasing; a longer sequence alone). No compute goes to padding but the tail that
  makes T a multiple of the TP size under sequence parallelism.
- padded: one row per sequence, right-padded to the longest, at most `budget` padded tokens.
Either way the per-token values of the loss (`loss_mask`, `rollout_logprobs`, and the old /
reference log-probs and advantages the actor adds) are laid out one row per sequence [B, S]; a
packed micro-batch says where each of those tokens sits in the packed row (`packed_index`,
`packed_valid`; `models.packing.as_rows`), so losses and metrics are the same code for both.
The same partition is used for the old/ref log-prob passes and for training, so the first step's
ratio is exactly 1 and its KL exactly 0 (same ops, same shapes). Labels are the next tokens of
the response part (label at position t is token t+1); prompt and padding positions carry -100
and a zero loss mask. `mb["sequences"]` lists the micro-batch's rows as indices into the
sequences it was built from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eureka_megatron.models.packing import cu_seqlens, pack_sequences
from eureka_megatron.models.routing_replay import filler

IGNORE = -100


@dataclass
class Sequence:
    prompt_ids: list[int]
    response_ids: list[int]
    mm_inputs: dict = field(default_factory=dict)  # the prompt's processor tensors
    rollout_logprobs: list[float] | None = None
    group: int = 0  # index of the prompt's group in the rollout batch
    index: int = -1  # position in the step's sequence list
    # MoE routing replay: the engine's experts per token [len - 1, MoE layers, k]
    # (models/routing_replay.py); None: the trainer's routers decide
    routed_experts: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def mini_batch_groups(seqs: list[Sequence], mini_batches: int) -> list[list[Sequence]]:
    """The step's sequences split into `mini_batches` mini-batches of whole GRPO groups (in
    group order; the last may hold the remainder)."""
    groups = sorted({s.group for s in seqs})
    per_mini = max(1, len(groups) // mini_batches)
    return [[s for s in seqs if s.group in set(groups[m:m + per_mini])]
            for m in range(0, len(groups), per_mini)]


def dp_share(seqs: list[Sequence], dp_rank: int, dp: int) -> list[Sequence]:
    """This DP rank's sequences, balanced by tokens: longest first, each to the rank with the
    fewest tokens so far (ties: the lower rank), so the ranks' step times match whatever the
    order and lengths of the groups. Every rank gets a sequence when there are >= dp."""
    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
    load = [0] * dp
    mine = []
    for i in order:
        r = min(range(dp), key=lambda k: (load[k], k))
        load[r] += len(seqs[i])
        if r == dp_rank:
            mine.append(seqs[i])
    return mine


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
    routing = _routing(seqs, width)
    if routing is not None:
        out["routed_experts"] = routing
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


def _routing(seqs: list[Sequence], width: int) -> torch.Tensor | None:
    """[B, width, layers, k] engine expert ids of the rows (routing replay), or None when no
    sequence carries them; positions without a recorded choice hold `routing_replay.filler`."""
    recorded = [s.routed_experts for s in seqs if s.routed_experts is not None]
    if not recorded:
        return None
    if len(recorded) != len(seqs):
        raise ValueError("routing replay: some sequences of a micro-batch carry the engine's "
                         "routed experts and some do not")
    _, layers, k = recorded[0].shape
    out = filler(len(seqs) * width, layers, k, recorded[0].dtype).view(len(seqs), width, layers, k)
    for i, s in enumerate(seqs):
        r = s.routed_experts
        if r.shape[0] != len(s) - 1 or tuple(r.shape[1:]) != (layers, k):
            raise ValueError(f"routing replay: a sequence of {len(s)} tokens has routed experts of "
                             f"shape {tuple(r.shape)}; expected ({len(s) - 1}, {layers}, {k})")
        out[i, :r.shape[0]] = r
    return out


def packed(raw: dict, pad_id: int, width_multiple: int = 1) -> dict:
    """A padded `collate` output as one packed row: input_ids and labels [1, T] (T the real
    tokens, rounded up to `width_multiple` with a padding tail), `cu_seqlens` (the tail, if any,
    is one more sequence: megatron's THD code wants the row covered), `max_seqlen`, and where
    each row's tokens went (`packed_index`, `packed_valid` [B, S]); the mm tensors unchanged."""
    valid = raw["attention_mask"].bool()
    lengths = valid.sum(1).tolist()
    real = sum(lengths)
    total = -(-real // width_multiple) * width_multiple
    ids = torch.full((1, total), pad_id, dtype=torch.long)
    labels = torch.full((1, total), IGNORE, dtype=torch.long)
    ids[0, :real] = raw["input_ids"][valid]  # right padding: row-major order concatenates rows
    labels[0, :real] = raw["labels"][valid]
    index = torch.zeros(valid.shape, dtype=torch.long)
    index[valid] = torch.arange(real)
    seqlens = lengths + ([total - real] if total > real else [])
    out = {k: v for k, v in raw.items() if k not in ("input_ids", "attention_mask", "labels")}
    if "routed_experts" in raw:
        routing = raw["routed_experts"]
        row = filler(total, *routing.shape[2:], dtype=routing.dtype)
        row[:real] = routing[valid]
        out["routed_experts"] = row[None]
    out.update(input_ids=ids, labels=labels, cu_seqlens=cu_seqlens(seqlens),
               max_seqlen=max(seqlens), packed_index=index, packed_valid=valid)
    return out


def micro_batches(seqs: list[Sequence], budget: int, pad_id: int, prepare,
                  image_token_id: int | None = None, width_multiple: int = 1,
                  pack: bool = False) -> list[dict]:
    """Collated micro-batches of `seqs` (this DP rank's share), packed or padded (module doc);
    `prepare(inputs) -> mb` adds the family's model inputs (positions, mm tensors) -- see
    models.family.Family.prepare. `image_token_id`, `width_multiple`: see `collate`."""
    out = []
    parts = partition([len(s) for s in seqs], budget, pack)
    for idx in parts:
        raw = collate([seqs[i] for i in idx], pad_id, image_token_id,
                      1 if pack else width_multiple)
        if pack:
            raw = packed(raw, pad_id, width_multiple)
        inputs = dict(raw)
        if "row_image_grid_thw" in raw:  # positions follow each row's images
            inputs["image_grid_thw"] = raw["row_image_grid_thw"]
        mb = prepare(inputs)
        for k in ("image_grid_thw", "image_index", "labels", "loss_mask", "rollout_logprobs",
                  "cu_seqlens", "max_seqlen", "packed_index", "packed_valid", "routed_experts"):
            if k in raw:
                mb[k] = raw[k]
        # Right padding: causal attention alone keeps real tokens from seeing padding, so no
        # [B, 1, S, S] mask is built (positions were derived from the mask above); a packed
        # row's attention is bounded by `cu_seqlens`.
        mb["attention_mask"] = None
        mb["sequences"] = idx
        mb["real_tokens"] = sum(len(seqs[i]) for i in idx)
        out.append(mb)
    return out


def partition(lengths: list[int], budget: int, pack: bool) -> list[list[int]]:
    """The micro-batches' sequence indices: packed bins of <= budget real tokens, or
    consecutive padded groups of <= budget rows x longest."""
    return pack_sequences(lengths, budget) if pack else token_budget_partition(lengths, budget)


def computed_tokens(lengths: list[int], parts: list[list[int]], pack: bool,
                    width_multiple: int = 1) -> int:
    """Tokens the model computes for these micro-batches (`partition`), padding included: a
    packed row's real tokens rounded up to `width_multiple`, or rows x the padded width."""
    total = 0
    for idx in parts:
        n = [lengths[i] for i in idx]
        if pack:
            total += -(-sum(n) // width_multiple) * width_multiple
        else:
            total += len(n) * (-(-max(n) // width_multiple) * width_multiple)
    return total
