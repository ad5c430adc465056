"""Forward-only passes through megatron's pipeline schedule: full logits (checks) or token log-probs."""
from __future__ import annotations

from typing import Callable

import torch

from eureka_megatron.models.packing import as_rows
from eureka_megatron.models.logprobs import (final_hidden_states, is_last_stage_chunk,
                                             token_logprobs, unwrap)


def on_device(mb: dict) -> dict:
    """The micro-batch's tensors on this rank's GPU (micro-batches are built on the host); as is
    without CUDA."""
    if not torch.cuda.is_available():
        return mb
    device = torch.device("cuda", torch.cuda.current_device())
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}


def forward_logits(chunks: list[torch.nn.Module], micro_batch: dict,
                   call: Callable[[torch.nn.Module, dict], torch.Tensor]) -> torch.Tensor | None:
    """Run `call(chunk, micro_batch)` under the schedule (any TP/PP/VPP); returns the
    TP-gathered [B, S, padded vocab] logits on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    out = []

    def step(it, chunk):
        y = call(chunk, on_device(next(it)))
        if ps.is_pipeline_last_stage():
            out.append(gather_from_tensor_model_parallel_region(y).detach())
        return y, lambda o: (o.sum() * 0, torch.tensor(1), {})

    ids = micro_batch["input_ids"]
    iters = [iter([micro_batch]) for _ in chunks]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
            seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=True)
    return out[0] if out else None


def forward_token_logprobs(chunks: list[torch.nn.Module], micro_batches: list[dict],
                           call: Callable[[torch.nn.Module, dict], torch.Tensor], vocab_size: int,
                           temperature: float = 1.0, backend: str | None = None) -> list[torch.Tensor]:
    """Log-probs [B, S] (float32, on the host) of each micro-batch's `labels` through the fused
    kernel, never building logits; forward only, any TP/PP/VPP; returned on every rank
    (broadcast over PP).
    A packed micro-batch's come one row per sequence (`models.packing.as_rows`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    out = []

    def step(it, chunk):
        mb = on_device(next(it))
        model = unwrap(chunk)
        if not is_last_stage_chunk(model):
            return call(chunk, mb), lambda o: (o.sum() * 0, torch.tensor(1), {})
        with final_hidden_states(model):
            hidden = call(chunk, mb)

        def record(h):
            lp, _ = token_logprobs(model, h, mb["labels"], vocab_size, temperature, backend)
            out.append(as_rows(lp.detach().float(), mb))
            return h.sum() * 0, torch.tensor(1), {}

        return hidden, record

    mb0 = micro_batches[0]["input_ids"]
    iters = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step, data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(micro_batches),
            seq_length=mb0.shape[1], micro_batch_size=mb0.shape[0], forward_only=True)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        src = ps.get_pipeline_model_parallel_last_rank()
        group = ps.get_pipeline_model_parallel_group()
        if not out:
            device = torch.cuda.current_device() if torch.cuda.is_available() else None
            out = [torch.empty(_rows_shape(mb), dtype=torch.float32, device=device)
                   for mb in micro_batches]
        for t in out:
            torch.distributed.broadcast(t, src=src, group=group)
    return [t.cpu() for t in out]  # beside the micro-batches they belong to


def _rows_shape(mb: dict) -> tuple[int, ...]:
    index = mb.get("packed_index")
    return tuple(index.shape) if index is not None else tuple(mb["labels"].shape)
