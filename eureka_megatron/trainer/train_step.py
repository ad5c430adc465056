"""One Megatron training step with a pluggable loss.

`TrainableModel` owns the megatron pieces of a trainable model: the DDP-wrapped chunks, the
(distributed) optimizer and the warmup+cosine scheduler. `train_step` runs megatron's real
pipeline schedule over the micro-batches, clips, steps, and returns metrics that are identical on
every rank.

The loss is a `ForwardFn(model, micro_batch) -> (output, loss_fn)`; `loss_fn(output)` returns
`(numerator, count, report)`: the summed loss, the number of units it sums over (tokens,
sequences, ...), and tensors to report. Megatron divides the gradients by the count summed over all
micro-batches and DP ranks, so token-mean, sequence-mean and fixed-denominator losses are all the
same contract and give the same gradient at any parallel layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from eureka_megatron.config import OptimConfig
from eureka_megatron.models.forward import on_device
from eureka_megatron.models.logprobs import unwrap
from eureka_megatron.runtime import cpu_compat

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]
ForwardFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, LossFn]]


@dataclass
class TrainableModel:
    chunks: list  # DDP-wrapped megatron modules, one per virtual pipeline stage
    optimizer: Any
    scheduler: Any
    # overlap_param_gather: an optimizer step ran since the parameters were last gathered
    params_pending: bool = False

    @property
    def unwrapped(self) -> list[torch.nn.Module]:
        """The bare GPTModel-like chunks (inside DDP and Float16Module)."""
        return [unwrap(c) for c in self.chunks]

    def gather_params(self) -> None:
        """Collective: every rank's parameters up to date, before reading them outside a forward
        pass (checkpoint save / load, weight sync, HF export). With overlap_param_gather the
        optimizer step updates only this rank's DP shard of the parameter buffers; the rest
        arrives with the next forward pass, whose pre-hooks wait for megatron's async all-gather
        bucket by bucket. This finishes (or runs) that all-gather now."""
        if self.params_pending:
            for c in self.chunks:
                c.start_param_sync(force_sync=True)
            self.params_pending = False


def wrap_for_training(chunks: list[torch.nn.Module], optim: OptimConfig, *, bf16: bool,
                      decay_steps: int) -> TrainableModel:
    """DDP + distributed optimizer + scheduler around freshly built (and initialised) chunks;
    the lr decays over `optim.decay_steps`, else `decay_steps` optimizer steps."""
    cpu_compat.activate()
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig,
                                           finalize_model_grads)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    tcfg = chunks[0].config
    o = optim
    if bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    overlap_grad, overlap_param = o.overlap(torch.cuda.is_available())
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad,
        overlap_param_gather=overlap_param,
        use_distributed_optimizer=o.distributed_optimizer,
        bucket_size=o.ddp_bucket_size,
    )
    wrapped = [
        DistributedDataParallel(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    opt_cfg = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, wrapped)
    decay = o.decay_steps or decay_steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(decay, o.warmup_steps + 1),
        lr_decay_style="cosine", start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant",
    )
    scheduler.step(increment=1)  # so the first step trains at lr/warmup, not at lr 0
    # The schedules call these hooks; megatron-LM's training loop sets them the same way.
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.no_sync_func = _per_chunk([m.no_sync for m in wrapped])
    if overlap_grad:  # each chunk's reduce starts after its last backward (PP stages aligned)
        tcfg.grad_sync_func = _per_chunk([m.start_grad_sync for m in wrapped])
    # No param_sync_func: that is megatron's align_param_gather (interleaved schedule with
    # overlapped P2P); here each chunk's forward pre-hooks start and wait for its gathers.
    return TrainableModel(wrapped, optimizer, scheduler)


def _per_chunk(funcs: list):
    """A schedule hook as megatron takes it: one callable, or one per virtual pipeline chunk."""
    return funcs if len(funcs) > 1 else funcs[0]


def _last_stage_broadcast(t: torch.Tensor) -> torch.Tensor:
    """Make a last-pipeline-stage value known on every stage."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return t


_SUM = (torch.sum, torch.distributed.ReduceOp.SUM)
_MAX = (torch.amax, torch.distributed.ReduceOp.MAX)
_MIN = (torch.amin, torch.distributed.ReduceOp.MIN)


def run_forward_backward(model: TrainableModel, micro_batches: list[dict], forward_fn: ForwardFn,
                         forward_only: bool = False) -> dict[str, float]:
    """Megatron's schedule over `micro_batches`; returns the reported values, summed over
    micro-batches and DP ranks (`*_max` / `*_min` keys: max / min), the same on all ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, chunk):
        return forward_fn(chunk, on_device(next(data_iterator)))

    mb0 = micro_batches[0]["input_ids"]
    iters = [iter(micro_batches) for _ in model.chunks]
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters if len(iters) > 1 else iters[0],
        model=model.chunks if len(model.chunks) > 1 else model.chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=mb0.shape[1],
        micro_batch_size=mb0.shape[0],
        forward_only=forward_only,
    )
    # Sum every reported tensor over micro-batches, then over DP; then share across PP stages.
    keys = [sorted(reports[0]) if reports else None]
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast_object_list(
            keys, src=ps.get_pipeline_model_parallel_last_rank(),
            group=ps.get_pipeline_model_parallel_group())
    keys = keys[0] or []
    out = {}
    dp = ps.get_data_parallel_group()
    for op, sel in ((_MAX, lambda k: k.endswith("_max")), (_MIN, lambda k: k.endswith("_min")),
                    (_SUM, lambda k: not k.endswith(("_max", "_min")))):
        names = [k for k in keys if sel(k)]
        if not names:
            continue
        vals = torch.zeros(len(names), dtype=torch.float64)
        if reports:
            vals = torch.stack([op[0](torch.stack([r[k].detach().double().reshape(()) for r in reports]))
                                for k in names])
            torch.distributed.all_reduce(vals, op=op[1], group=dp)
        _last_stage_broadcast(vals)
        out.update(zip(names, vals.tolist()))
    return out


def train_step(model: TrainableModel, micro_batches: list[dict], forward_fn: ForwardFn) -> dict[str, float]:
    """One optimizer step over `micro_batches` (this DP rank's share of the global batch)."""
    for c in model.chunks:
        c.zero_grad_buffer()
    model.optimizer.zero_grad()
    sums = run_forward_backward(model, micro_batches, forward_fn)
    ok, grad_norm, _ = model.optimizer.step()
    model.params_pending = model.chunks[0].ddp_config.overlap_param_gather
    lr = model.optimizer.param_groups[0]["lr"]
    model.scheduler.step(increment=1)
    metrics = finish_metrics(sums)
    metrics.update(grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
                   lr=float(lr), update_ok=float(bool(ok)))
    return metrics


def finish_metrics(sums: dict[str, float]) -> dict[str, float]:
    """`x_sum` / `count` -> `x`, `x_tsum` / `tokens` -> `x`; other values pass through."""
    out = dict(sums)
    for suffix, by in (("_sum", "count"), ("_tsum", "tokens")):
        total = sums.get(by)
        for k, v in sums.items():
            if k.endswith(suffix) and total:
                out[k[: -len(suffix)]] = v / total
    return out


# --- the language-model loss (the RL loss plugs in the same way) ----------------------------


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """-inf on the padded vocab rows held by this TP rank, so they never enter the softmax."""
    from megatron.core import parallel_state as ps

    v_local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v_local
    n_pad = start + v_local - vocab_size
    if n_pad <= 0:
        return logits
    logits = logits.clone()
    logits[..., max(0, v_local - n_pad):] = float("-inf")
    return logits


def lm_forward(vocab_size: int) -> ForwardFn:
    """Next-token cross-entropy over `loss_mask`, summed per micro-batch (count = tokens)."""
    from megatron.core import tensor_parallel

    def forward(chunk, mb):
        output = chunk(mb["input_ids"], mb.get("position_ids"), attention_mask=None)

        def loss_fn(logits):
            logits = mask_padded_vocab(logits.float(), vocab_size)
            per_token = tensor_parallel.vocab_parallel_cross_entropy(
                logits.transpose(0, 1).contiguous(), mb["labels"].transpose(0, 1).contiguous()
            ).transpose(0, 1)
            mask = mb["loss_mask"].float()
            loss_sum = (per_token * mask).sum()
            count = mask.sum().to(torch.int)
            return loss_sum, count, {"loss_sum": loss_sum.detach(), "count": count.detach().float()}

        return output, loss_fn

    return forward
