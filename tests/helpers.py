"""Helpers shared by tests: tiny configs and rank functions (module level, so ranks can import them)."""
from __future__ import annotations

from eureka_megatron.config import (CheckpointConfig, Config, OptimConfig, ParallelConfig,
                                    TrainConfig)
from eureka_megatron.models.llm_config import LLMConfig


def tiny_config(tp=1, pp=1, vpp=None, nproc=None, steps=3, tie=False, ckpt_dir=None, load=None,
                save_interval=0, sp=False, **train) -> Config:
    """A 4-layer GQA model with a padded vocab (1000 -> 1024) and 4 micro-batches per step."""
    nproc = nproc or tp * pp
    return Config(
        model=LLMConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline=vpp,
                                nproc=nproc, sequence_parallel=sp),
        optim=OptimConfig(lr=2e-3, min_lr=2e-4, warmup_steps=1, decay_steps=6),
        train=TrainConfig(steps=steps, seq_length=32, micro_batch_size=2,
                          global_batch_size=train.pop("global_batch_size", 8), **train),
        checkpoint=CheckpointConfig(dir=ckpt_dir, load=load, keep_last=0, save_interval=save_interval),
    ).validate()


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def fill_and_forward(chunks, tensors: dict, micro_batch, call):
    """Fill megatron `chunks` from global `tensors` ((key, layer) -> tensor), run one forward-only
    micro-batch with `call(chunk, micro_batch)`, and return (TP-gathered logits on the last
    pipeline stage, else None; the tensor keys this rank used)."""
    from eureka_megatron.models.forward import forward_logits
    from eureka_megatron.models.init import fill_global_tensors

    used = set()

    def source(key, layer, shape):
        used.add((key, layer))
        return tensors[(key, layer)]

    fill_global_tensors(chunks, source)
    return forward_logits(chunks, micro_batch, call), used
