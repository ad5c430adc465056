"""The RL run's rollout engine, from the config: an in-process HF engine, or SGLang engines.

SGLang engines come one of three ways, first match wins:
1. `rollout.sglang_url`: connect to running servers ("url1,url2,..."; one engine per URL).
2. Under the Ray launcher (`placement.current_placement()` with engine bundles): one engine actor
   per planned engine in the trainer's placement group (`ray_engine.place_engines`), each starting
   its SGLang server on the GPUs the plan gave it.
3. Otherwise `rollout.engines` local servers of `rollout.gpus_per_engine` GPUs each: colocated,
   engine e on the trainer's GPUs [e*g, (e+1)*g); disaggregated, on the GPUs after the trainer's
   `parallel.nproc` (the entries of CUDA_VISIBLE_DEVICES when it is set).

Several engines make one `EngineGroup`; a single engine is returned as it is. Colocated servers
that this run starts get `--enable-memory-saver`, which SGLang's release / resume of memory needs
(servers given by URL must have been started with it when `cluster.colocate` is true).

Weights reach colocated engines as tensors (CUDA-IPC handles of the trainer's GPU) and engines on
GPUs of their own by NCCL broadcast over a weight-update group (`rollout.weight_transport: auto`).
`rollout.deterministic` launches servers with --enable-deterministic-inference, so seeded rollouts
repeat and samples do not depend on the number of engines; a server given by URL must have been
started with it.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from eureka_megatron.rl_config import RLConfig
from eureka_megatron.rollout import ray_engine
from eureka_megatron.rollout.engine_group import EngineGroup
from eureka_megatron.rollout.hf_engine import HFEngine
from eureka_megatron.rollout.sglang import SGLangEngine
from eureka_megatron.rollout.sglang.engine import family_of_checkpoint
from eureka_megatron.runtime import placement

SGLANG_FACTORY = "eureka_megatron.rollout.sglang:SGLangEngine.launch"
ENGINE_CALL_TIMEOUT = 3600.0  # Ray engine actors: a whole rollout is one call


def build_engine(cfg: RLConfig, hf_dir: Path):
    """The engine the driver samples with, serving `hf_dir`'s weights until the first sync."""
    if cfg.rollout.engine == "sglang":  # one server, or an EngineGroup of several
        return build_sglang_engine(cfg, hf_dir)
    dtype = torch.bfloat16 if cfg.model.rollout_dtype == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFEngine.from_pretrained(hf_dir, dtype=dtype, device=device)


def build_sglang_engine(cfg: RLConfig, hf_dir: Path):
    r = cfg.rollout
    placed = placement.current_placement()
    if r.sglang_url:
        engines = connect_engines(r.sglang_url, cfg, hf_dir)
    elif placed is not None and placed[0].engine_bundles:
        layout, pg = placed
        # the engine actor gets each bucket through Ray and posts it to its server as tensors
        kwargs = dict(launch_kwargs(cfg, hf_dir), weight_transport="tensor")
        engines = ray_engine.place_engines(layout, pg, SGLANG_FACTORY, kwargs,
                                r.gpus_per_engine, timeout=ENGINE_CALL_TIMEOUT)
    else:
        engines = launch_local_engines(launch_kwargs(cfg, hf_dir), local_engine_gpus(cfg))
    return engines[0] if len(engines) == 1 else EngineGroup(engines)


def connect_engines(urls: str, cfg: RLConfig | None = None, hf_dir: Path | None = None) -> list:
    """Engines for running servers; the prompts' family (how their images are written) is the
    trainer's checkpoint's when known, else what each server reports."""
    kw = {} if cfg is None else dict(weight_transport=weight_transport(cfg))
    family = family_of_checkpoint(hf_dir) if hf_dir is not None else None
    if family is not None:
        kw["family"] = family
    engines = [SGLangEngine.connect(u.strip(), **kw) for u in urls.split(",") if u.strip()]
    if cfg is not None and cfg.rollout.deterministic:
        plain = [e.url for e in engines if not e.deterministic]
        if plain:
            raise ValueError(f"rollout.deterministic=true, but SGLang server(s) {plain} run "
                             "without --enable-deterministic-inference (they ignore seeds)")
    return engines


def weight_transport(cfg: RLConfig) -> str:
    """auto: tensors to colocated engines; a broadcast group to engines on GPUs of their own
    (on a machine without CUDA every engine is sent tensors: nothing to broadcast over NCCL)."""
    t = cfg.rollout.weight_transport
    if t != "auto":
        return t
    return "distributed" if not cfg.cluster.colocate and torch.cuda.is_available() else "tensor"


def launch_kwargs(cfg: RLConfig, hf_dir: Path) -> dict:
    """`SGLangEngine.launch` keyword arguments for one engine of this run."""
    extra = ["--enable-memory-saver"] if cfg.cluster.colocate else []
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


def launch_local_engines(kwargs: dict, gpus: list[list[str] | None]) -> list:
    """One server per entry of `gpus`, started concurrently (each takes minutes on a GPU); if one
    fails, the others are stopped and the error names the engine."""
    def start(devices):
        env = {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if devices else None
        return SGLangEngine.launch(**kwargs, env=env)

    with ThreadPoolExecutor(len(gpus)) as pool:
        futures = [pool.submit(start, d) for d in gpus]
    errors = [(e, f.exception()) for e, f in enumerate(futures) if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().shutdown()
        e, err = errors[0]
        raise RuntimeError(f"SGLang engine {e} of {len(gpus)} (GPUs {gpus[e]}) failed to start: "
                           f"{type(err).__name__}: {err}") from err
    return [f.result() for f in futures]
