"""Stage 0: teach only the answer format, with random answers (collective, all ranks).

Targets are `<think> {think} </think> <answer> {a} </answer><eos>` with `a` drawn uniformly from
the training set's distinct gold answers, independent of the image: the model learns to emit the
format, and its held-out accuracy stays near chance, so everything it gains afterwards comes from
the rule-based RL. The result is written as an HF checkpoint (`output.dir/stage0_hf`) that the RL
stage starts from (and a resumed run reuses).
"""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import torch

from eureka_megatron.config import RLConfig
from eureka_megatron.data.dataset import PromptStream
from eureka_megatron.data.sources import prompt_builder, train_rows
from eureka_megatron.runtime.distributed import broadcast_object
from eureka_megatron.trainer.actor import Actor
from eureka_megatron.trainer.batches import Sequence, dp_share


def format_target(think: str, answer: str) -> str:
    return f"<think> {think} </think> <answer> {answer} </answer>"


def format_warmup(cfg: RLConfig) -> Path:
    from megatron.core import parallel_state as ps
    from transformers import AutoTokenizer

    out = Path(cfg.output.dir) / "stage0_hf"
    if (out / "config.json").is_file():
        return out
    w = cfg.warmup
    wcfg = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, lr=w.lr, min_lr=w.lr, warmup_steps=0,
                                       decay_steps=None),
        train=dataclasses.replace(cfg.train, steps=w.steps, mini_batches=1, epochs=1))
    actor = Actor(wcfg, need_reference=False)
    rank0 = torch.distributed.get_rank() == 0
    stream = pad_id = eos = None
    if rank0:
        tok = AutoTokenizer.from_pretrained(str(cfg.model.hf_dir))
        rows = train_rows(cfg).rows
        answers = sorted({r.answer for r in rows})
        stream = PromptStream(rows, prompt_builder(cfg, actor.family.name, tok),
                              seed=cfg.train.seed + 7, shuffle=True)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = tok.eos_token_id
        rng = random.Random(cfg.train.seed)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    forward = actor.supervised_forward()
    t0 = time.perf_counter()
    for step in range(1, w.steps + 1):
        seqs = None
        if rank0:
            seqs = []
            for item in stream.next_batch(w.batch_size):
                target = tok(format_target(w.think, rng.choice(answers)),
                             add_special_tokens=False)["input_ids"] + [eos]
                seqs.append(Sequence(list(item.prompt.input_ids), target, item.prompt.mm_inputs))
        seqs, pad = broadcast_object((seqs, pad_id))
        mbs = actor.micro_batches(dp_share(seqs, dp_rank, dp), pad)
        m = actor.train_micro_batches(mbs, forward)
        if rank0 and cfg.output.progress and (step % 25 == 0 or step in (1, w.steps)):
            print(f"stage 0 (format warm-up) {step}/{w.steps}  nll {m.get('loss', float('nan')):.4f}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    actor.export_hf(out, cfg.model.hf_dir)
    del actor
    return out
