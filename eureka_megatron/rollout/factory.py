"""The one place a rollout engine is built, for the RL run (`trainer/engines.py` turns its config
into these arguments) and for `eval`: an in-process HF engine, or SGLang engines.

SGLang engines come one of three ways, first match wins:
1. `sglang_url`: connect to running servers ("url1,url2,..."; one engine per URL).
2. Under the Ray launcher (`placement.current_placement()` with engine bundles): one engine actor
   per planned engine in the trainer's placement group (`ray_engine.place_engines`), each starting
   its SGLang server on the GPUs the plan gave it.
3. Otherwise one local server per entry of `engine_gpus()`, started concurrently.

Several engines make one `EngineGroup`; a single engine is returned as it is.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch

from eureka_megatron.rollout import ray_engine
from eureka_megatron.rollout.engine_group import EngineGroup
from eureka_megatron.rollout.hf_engine import HFEngine, load_processor
from eureka_megatron.rollout.sglang import SGLangEngine
from eureka_megatron.rollout.sglang.engine import family_of_checkpoint
from eureka_megatron.runtime import placement

SGLANG_FACTORY = "eureka_megatron.rollout.sglang:SGLangEngine.launch"
ENGINE_CALL_TIMEOUT = 3600.0  # Ray engine actors: a whole rollout is one call
HF_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build_engine(kind: str, hf_dir: Path, *, dtype: str = "auto", device: str | None = None,
                 sglang_url: str | None = None, launch: dict | None = None,
                 engine_gpus: Callable[[], Sequence[list[str] | None]] = lambda: [None],
                 weight_transport: str | None = None, deterministic: bool = False):
    """An engine serving `hf_dir`'s weights; for a directory of side files only (a megatron
    checkpoint's `hf/`), an engine of the right shapes that waits for its first weight sync.

    kind "hf": an HFEngine on `device` (default: cuda when available) in `dtype`: "bf16",
        "fp32", or "auto" (bf16 on a GPU, fp32 on the CPU).
    kind "sglang": see the module docstring. launch: `SGLangEngine.launch` keyword arguments
        (model_path defaults to hf_dir, tp to 1); engine_gpus: each local engine's GPUs as
        CUDA_VISIBLE_DEVICES entries (None: this process's), asked only when engines are
        launched here; weight_transport, deterministic: of connected servers (default theirs;
        deterministic refuses servers that ignore seeds).
    """
    weights = has_weights(hf_dir)
    if kind == "hf":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bf16" if device != "cpu" else "fp32"
        if not weights:  # the trainer loaded a megatron checkpoint: its first sync fills these
            return HFEngine.from_config(hf_dir, dtype=HF_DTYPES[dtype], device=device,
                                        tokenizer_or_processor=load_processor(hf_dir))
        return HFEngine.from_pretrained(hf_dir, dtype=HF_DTYPES[dtype], device=device)
    if kind != "sglang":
        raise ValueError(f"rollout engine {kind!r}: expected 'hf' or 'sglang'")
    launch = {"model_path": str(hf_dir), **(launch or {})}
    if not weights:  # random weights of the right shapes; generating waits for the first sync
        launch |= {"weight_version": None,
                   "extra_args": [*launch.get("extra_args", ()), "--load-format", "dummy"]}
    placed = placement.current_placement()
    if sglang_url:
        engines = connect_engines(sglang_url, hf_dir, weight_transport=weight_transport,
                                  deterministic=deterministic)
    elif placed is not None and placed[0].engine_bundles:
        layout, pg = placed
        # tensors: each bucket goes through Ray to the actor, which posts it to its server;
        # distributed: the trainer's senders broadcast to the server's GPUs, the actor posts
        engines = ray_engine.place_engines(layout, pg, SGLANG_FACTORY,
                                           {"weight_transport": "tensor", **launch},
                                           launch.get("tp", 1), timeout=ENGINE_CALL_TIMEOUT)
    else:
        engines = launch_local_engines(launch, engine_gpus())
    return engines[0] if len(engines) == 1 else EngineGroup(engines)


def has_weights(hf_dir: Path) -> bool:
    """An HF directory with weights, or only the side files (config, tokenizer) of a megatron
    checkpoint (`convert hf-to-megatron`'s `hf/`)."""
    return any(Path(hf_dir).glob("*.safetensors"))


def connect_engines(urls: str, hf_dir: Path | None = None, *, weight_transport: str | None = None,
                    deterministic: bool = False) -> list:
    """Engines for running servers; the prompts' family (how their images are written) is
    `hf_dir`'s checkpoint's when known, else what each server reports."""
    kw = {} if weight_transport is None else {"weight_transport": weight_transport}
    family = family_of_checkpoint(hf_dir) if hf_dir is not None else None
    if family is not None:
        kw["family"] = family
    engines = [SGLangEngine.connect(u.strip(), **kw) for u in urls.split(",") if u.strip()]
    if deterministic:
        plain = [e.url for e in engines if not e.deterministic]
        if plain:
            raise ValueError(f"rollout.deterministic=true, but SGLang server(s) {plain} run "
                             "without --enable-deterministic-inference (they ignore seeds)")
    return engines


def launch_local_engines(kwargs: dict, gpus: Sequence[list[str] | None]) -> list:
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
