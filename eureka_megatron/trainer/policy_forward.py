"""The RL loss as a `ForwardFn` for `train_step`: Megatron forward -> fused log-probs -> policy loss.

The last pipeline stage returns its final hidden states (never [tokens x vocab] logits); the fused
kernel turns them into the log-probs and entropies of the micro-batch's `labels`, and
`algo.policy_loss_sums` into the (numerator, count) pair megatron accumulates across
micro-batches and DP ranks. Reported metrics are token-weighted sums (`*_tsum` / `tokens`), and
`*_max` / `*_min` reduce by max / min, so the step's metrics do not depend on the batch split.

Micro-batch keys (trainer/batches.py; a packed micro-batch's input_ids and labels are one row
[1, T] and `as_rows` lays its log-probs out as [B, S]): input_ids [B, S], labels [B, S] (the
token scored at each position, < 0 for none), loss_mask [B, S] (1 on response tokens), old_logprobs [B, S], advantages [B] (or [B, S]);
optional position_ids, ref_logprobs [B, S], rollout_logprobs [B, S] (the engine's: the mismatch
metrics, and `algo.rollout_is` reweighting, algo/mismatch.py); without old_logprobs the current
log-probs, detached, are used.
"""
from __future__ import annotations

from typing import Callable

import torch

from eureka_megatron.algo.mismatch import corrected, mismatch_sums
from eureka_megatron.algo.policy_loss import policy_loss_sums
from eureka_megatron.config import AlgoConfig
from eureka_megatron.models.packing import as_rows
from eureka_megatron.models.inputs import packed_params
from eureka_megatron.models.logprobs import (final_hidden_states, is_last_stage_chunk,
                                             token_logprobs, unwrap)


def gpt_call(chunk: torch.nn.Module, mb: dict) -> torch.Tensor:
    return chunk(mb["input_ids"], mb.get("position_ids"), attention_mask=None,
                 packed_seq_params=packed_params(mb))


def policy_forward(algo: AlgoConfig, vocab_size: int, *, temperature: float = 1.0,
                   sum_norm_length: int | None = None,
                   call: Callable[[torch.nn.Module, dict], torch.Tensor] = gpt_call,
                   backend: str | None = None):
    """A ForwardFn computing the policy loss of `algo` on each micro-batch.

    `call(chunk, micro_batch)` runs one model chunk (the default: our GPT; VLM actors pass their
    own); `temperature` must be the rollout's sampling temperature."""
    def forward(chunk, mb):
        model = unwrap(chunk)
        if not is_last_stage_chunk(model):
            return call(chunk, mb), None
        with final_hidden_states(model):
            hidden = call(chunk, mb)

        def loss_fn(hidden):
            lp, ent = token_logprobs(model, hidden, mb["labels"], vocab_size, temperature, backend)
            lp, ent = as_rows(lp, mb), as_rows(ent, mb)  # a packed row -> one row per sequence
            mask = mb["loss_mask"]
            # No old log-probs: the batch is trained on once (one epoch, one mini-batch), so the
            # old policy *is* the current one -- its log-probs are these, detached (ratio 1).
            old = mb["old_logprobs"] if mb.get("old_logprobs") is not None else lp.detach()
            rollout = mb.get("rollout_logprobs")
            advantages, loss_mask = mb["advantages"], mask
            if rollout is not None:  # the trainer's old policy vs the engine's sampling policy
                advantages, loss_mask = corrected(algo.rollout_is, algo.rollout_is_cap,
                                                  advantages, mask, old, rollout)
            numerator, count, metrics = policy_loss_sums(
                algo, lp, old, advantages, loss_mask,
                ref_logprobs=mb.get("ref_logprobs"), entropy=ent,
                sum_norm_length=sum_norm_length, backend=backend)
            tokens = (mask != 0).sum().double()
            report = {"loss_sum": numerator.detach().double(), "count": count.detach().double(),
                      "tokens": tokens,
                      "computed_tokens": torch.tensor(float(mb["input_ids"].numel()),
                                                      dtype=torch.float64)}
            if "real_tokens" in mb:  # prompt + response tokens (trainer/batches.py)
                report["real_tokens"] = torch.tensor(float(mb["real_tokens"]), dtype=torch.float64)
            if rollout is not None:
                report.update(mismatch_sums(old, rollout, mask, algo.rollout_is_cap))
            for k, v in metrics.items():
                if k.endswith(("_max", "_min")):
                    report[k] = v.detach().double()
                else:
                    report[f"{k}_tsum"] = v.detach().double() * tokens
            return numerator, count, report

        return hidden, loss_fn

    return forward
