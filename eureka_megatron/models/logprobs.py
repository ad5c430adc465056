"""Log-probs and entropy of given tokens straight from our models' final hidden states.

The RL trainer needs log p(token) three times per step (old policy, reference, train) and never
the [tokens x vocab] logits. `final_hidden_states` makes a megatron GPTModel chunk (ours, or the
language model inside a VLM) return the hidden states its output layer would have consumed;
`token_logprobs` feeds them and the (TP-sharded) output-layer weight to the fused kernel, which
keeps the vocabulary tiled and reduces only per-token statistics over the TP group.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from eureka_megatron.kernels.logprob import logprob_entropy


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def is_last_stage_chunk(model: torch.nn.Module) -> bool:
    """Whether this (unwrapped) chunk ends in the output layer."""
    return bool(getattr(_gpt(model), "post_process", True))


def _gpt(model: torch.nn.Module):
    """The GPTModel inside one of our chunks (the chunk itself for the plain LLM)."""
    return getattr(model, "language_model", model)


@contextmanager
def final_hidden_states(model: torch.nn.Module):
    """Within the block, the last pipeline stage's forward returns [B, S, H] hidden states
    (after the final norm) instead of logits: the output layer passes its input through --
    gathered over TP first under sequence parallelism. The gather's backward only hands each
    rank its slice: the vocab-parallel log-prob kernel already sums the hidden states' gradient
    over TP (what the output layer's own backward would do)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    gpt = _gpt(model)
    layer = gpt.output_layer
    original = layer.forward
    if gpt.config.sequence_parallel:
        layer.forward = lambda x, weight=None, runtime_gather_output=None, **_: (
            gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False), None)
    else:
        layer.forward = lambda x, weight=None, runtime_gather_output=None, **_: (x, None)
    try:
        yield
    finally:
        layer.forward = original


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """This rank's vocab shard of the output layer (the embedding when tied)."""
    gpt = _gpt(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def token_logprobs(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   vocab_size: int, temperature: float = 1.0, backend: str | None = None):
    """(logprobs, entropy) [B, S] float32 of `labels` [B, S] (global token ids; < 0 ignored)
    from `hidden` [B, S, H]; differentiable, gradients reach the hidden states and the weight."""
    from megatron.core import parallel_state as ps

    group = (ps.get_tensor_model_parallel_group()
             if ps.get_tensor_model_parallel_world_size() > 1 else None)
    B, S, H = hidden.shape
    lp, ent = logprob_entropy(hidden.reshape(B * S, H), output_weight(model), labels.reshape(-1),
                              temperature=temperature, vocab_size=vocab_size, tp_group=group,
                              backend=backend)
    return lp.view(B, S), ent.view(B, S)
