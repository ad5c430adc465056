"""The RL run's rollout engine: its config turned into `rollout.factory.build_engine`'s arguments.

Local SGLang engines (`rollout.engines` servers of `rollout.gpus_per_engine` GPUs each):
colocated, engine e on the trainer's GPUs [e*g, (e+1)*g); disaggregated, on the GPUs after the
trainer's `parallel.nproc` (the entries of CUDA_VISIBLE_DEVICES when it is set). Colocated
servers that this run starts get `--enable-memory-saver`, which SGLang's release / resume of
memory needs (servers given by URL must have been started with it when `cluster.colocate` is
true).

Weights reach colocated engines as tensors (CUDA-IPC handles of the trainer's GPU) and engines on
GPUs of their own by NCCL broadcast from each pipeline stage's sender (`rollout.weight_transport:
auto`; rollout/weight_broadcast.py). `distributed` forces the broadcast, over gloo on a CPU.
`rollout.deterministic` launches servers with --enable-deterministic-inference, so seeded rollouts
repeat and samples do not depend on the number of engines; a server given by URL must have been
started with it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from eureka_megatron.config import RLConfig
from eureka_megatron.rollout import factory
from eureka_megatron.rollout.sglang.flags import ROUTED_EXPERTS_FLAG


def build_engine(cfg: RLConfig, hf_dir: Path):
    """The engine the driver samples with, serving `hf_dir`'s weights until the first sync."""
    r = cfg.rollout
    return factory.build_engine(r.engine, hf_dir, dtype=cfg.model.rollout_dtype,
                                sglang_url=r.sglang_url, launch=launch_kwargs(cfg, hf_dir),
                                engine_gpus=lambda: local_engine_gpus(cfg),
                                weight_transport=weight_transport(cfg),
                                deterministic=r.deterministic)


def weight_transport(cfg: RLConfig) -> str:
    """auto: tensors to colocated engines; broadcast groups to engines on GPUs of their own
    (on a machine without CUDA every engine is sent tensors unless `distributed` is set, which
    runs the broadcast over gloo)."""
    t = cfg.rollout.weight_transport
    if t != "auto":
        return t
    return "distributed" if not cfg.cluster.colocate and torch.cuda.is_available() else "tensor"


def launch_kwargs(cfg: RLConfig, hf_dir: Path) -> dict:
    """`SGLangEngine.launch` keyword arguments for one engine of this run."""
    extra = ["--enable-memory-saver"] if cfg.cluster.colocate else []
    if cfg.rollout.routing_replay:
        extra.append(ROUTED_EXPERTS_FLAG)
    return dict(model_path=str(hf_dir), tp=cfg.rollout.gpus_per_engine,
                mem_fraction_static=cfg.rollout.mem_fraction_static,
                deterministic=cfg.rollout.deterministic, weight_transport=weight_transport(cfg),
                extra_args=extra)


def local_engine_gpus(cfg: RLConfig, visible: list[str] | None = None) -> list[list[str] | None]:
    """Per local engine, its GPUs as CUDA_VISIBLE_DEVICES entries; None each without GPUs.

    visible: the GPUs this process may use (default: CUDA_VISIBLE_DEVICES, else every GPU)."""
    r = cfg.rollout
    if visible is None:
        if not torch.cuda.is_available():
            return [None] * r.engines
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        visible = ([d.strip() for d in env.split(",") if d.strip()] if env
                   else [str(i) for i in range(torch.cuda.device_count())])
    g = r.gpus_per_engine
    first = 0 if cfg.cluster.colocate else cfg.parallel.nproc
    need = first + r.engines * g
    if need > len(visible):
        where = ("on the trainer's GPUs" if cfg.cluster.colocate
                 else f"after the trainer's {cfg.parallel.nproc} GPUs")
        raise ValueError(f"{r.engines} SGLang engine(s) x {g} GPU(s) {where} need GPUs "
                         f"{first}..{need - 1}, but {len(visible)} are visible ({visible})")
    return [visible[first + e * g:first + (e + 1) * g] for e in range(r.engines)]
