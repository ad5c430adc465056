"""One forward-only micro-batch through megatron's pipeline schedule, returning full logits."""
from __future__ import annotations

from typing import Callable

import torch


def forward_logits(chunks: list[torch.nn.Module], micro_batch: dict,
                   call: Callable[[torch.nn.Module, dict], torch.Tensor]) -> torch.Tensor | None:
    """Run `call(chunk, micro_batch)` under the schedule (any TP/PP/VPP); returns the
    TP-gathered [B, S, padded vocab] logits on the last pipeline stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    out = []

    def step(it, chunk):
        y = call(chunk, next(it))
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
