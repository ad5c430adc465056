"""The language-model training run: the foundation's end-to-end job on megatron.

Builds the Qwen2.5-family LLM at the configured TP/PP/DP, trains it on the synthetic token
patterns with the real schedules and distributed optimizer, saves atomic checkpoints and resumes
from them. It is the rank function behind `eureka-megatron train-lm`, the layout-invariance tests
and `bench lm-step`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from eureka_megatron.config import Config
from eureka_megatron.data.token_patterns import pattern_batch, split_batch
from eureka_megatron.models.init import layout_invariant_init
from eureka_megatron.models.llm import build_llm_chunks, building
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.trainer import checkpoint as ckpt
from eureka_megatron.trainer.train_step import TrainableModel, lm_forward, train_step, wrap_for_training


def build_trainable(cfg: Config) -> TrainableModel:
    """Model chunks with layout-invariant weights, wrapped for training (parallel_state ready)."""
    with building(recompute=cfg.train.recompute):
        chunks = build_llm_chunks(cfg.model, cfg.parallel)
    layout_invariant_init(chunks, cfg.train.seed, cfg.model.init_std)
    return wrap_for_training(chunks, cfg.optim, bf16=cfg.parallel.bf16, decay_steps=cfg.train.steps)


def run_lm(cfg: Config, stop_after: int | None = None, progress: bool = False) -> list[dict]:
    """Train `cfg.train.steps` steps (resuming from `cfg.checkpoint.load`); rank function.

    `stop_after` ends the run early after that many steps of this invocation (tests use it to
    emulate a run killed between checkpoints). Returns one metrics dict per step run here.
    """
    ckpt.check_run_dir(cfg.checkpoint.dir, cfg.checkpoint.load)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    from megatron.core import parallel_state as ps

    model = build_trainable(cfg)
    start = 0
    if cfg.checkpoint.load:
        start, _ = ckpt.load_checkpoint(cfg.checkpoint.load, model)
    forward = lm_forward(cfg.model.vocab_size)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    is_logger = torch.distributed.get_rank() == 0
    history: list[dict] = []
    save = cfg.checkpoint
    writer = ckpt.CheckpointWriter(save.async_save)
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch = pattern_batch(cfg.train.seed, step, cfg.train.global_batch_size,
                                  cfg.train.seq_length, cfg.model.vocab_size)
            metrics = train_step(model, split_batch(batch, dp_rank, dp, cfg.train.micro_batch_size),
                                 forward)
            dt = time.perf_counter() - t0
            tokens = cfg.train.global_batch_size * cfg.train.seq_length
            metrics.update(step=step, seconds=dt, tokens_per_s=tokens / dt)
            history.append(metrics)
            if progress and is_logger and (step % cfg.train.log_interval == 0 or step == start + 1
                                           or step == cfg.train.steps):
                print(f"step {step:>5}/{cfg.train.steps}  loss {metrics['loss']:.4f}  "
                      f"grad-norm {metrics['grad_norm']:.4f}  lr {metrics['lr']:.2e}  "
                      f"{metrics['tokens_per_s']:.0f} tok/s", flush=True)
            writer.poll()  # an async save that finished is published (collective)
            if save.dir and ((save.save_interval and step % save.save_interval == 0)
                             or step == cfg.train.steps):
                writer.save(save.dir, step, model, {"data_step": step}, save.keep_last)
            if stop_after is not None and len(history) >= stop_after:
                break
        writer.finish()
    except BaseException:
        writer.abort()  # this rank's writer ends with it; nothing half-written is published
        raise
    if save.dir and is_logger:
        with open(Path(save.dir) / "metrics.jsonl", "a") as f:
            for m in history:
                f.write(json.dumps(m) + "\n")
    return history
