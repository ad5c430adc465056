"""`eureka-megatron forward`: logits of a megatron checkpoint at a chosen TP/PP (and EP for MoE).

The check a user runs on a converted checkpoint: feed the dict an HF processor returned (saved
with `torch.save`) through the megatron model, loaded by megatron's own dist_checkpointing at the
requested layout, and compare the logits with transformers'. Returns `{"logits": [B, S, vocab]}`
in float32 with the vocab padding removed. `--engine hf` instead syncs the loaded weights into a
rollout engine (the same export as training's weight sync) and returns the engine's logits: the
check that an engine runs exactly the trained weights. torch is imported on use, so the parser
stays torch-free.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from eureka_megatron.atomic import replacing
from eureka_megatron.config import ConfigError, ParallelConfig
from eureka_megatron.errors import InputNotFoundError, UserError
from eureka_megatron.models.llm_config import LLMConfig, validate_layout

ENGINES = ("hf",)


class InputsError(UserError, ValueError):
    """An --inputs file that is not a dict of tensors with input_ids."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "forward", help="logits of a megatron checkpoint at a chosen TP/PP (check a conversion)",
        description="Load a megatron checkpoint with megatron's dist_checkpointing at TP x PP "
                    "(spawning TP*PP ranks on this machine) and run one batch. IN.pt is the dict "
                    "an HF processor returns, saved with torch.save (input_ids, optional "
                    "attention_mask; Qwen2.5-VL pixel_values + image_grid_thw; InternVL "
                    "pixel_values [tiles,3,H,W]). OUT.pt is {'logits': [B,S,vocab] float32}, "
                    "vocab padding removed.")
    p.add_argument("--megatron", required=True, type=Path, help="converted dir or step_* / run dir")
    p.add_argument("--inputs", required=True, type=Path, help="IN.pt")
    p.add_argument("--out", required=True, type=Path, help="OUT.pt")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size (MoE models): the experts split over EP ranks, which "
                        "run as data-parallel replicas of the batch; TP*PP*EP ranks in all")
    p.add_argument("--hf-config", type=Path, default=None,
                   help="dir with config.json (default: MEGATRON/hf)")
    p.add_argument("--engine", choices=ENGINES, default=None,
                   help="sync the loaded weights into this rollout engine and return ITS logits "
                        "(checks that an engine runs exactly the trained weights)")
    return p


def run(args) -> int:
    logits = run_forward(args.megatron, args.inputs, args.out, tp=args.tp, pp=args.pp,
                         hf_config_dir=args.hf_config, engine=args.engine, ep=args.ep)
    via = f", synced into the {args.engine} engine" if args.engine else ""
    experts = f" x EP{args.ep}" if args.ep > 1 else ""
    print(f"wrote {args.out}: logits {list(logits.shape)} float32 "
          f"(TP{args.tp} x PP{args.pp}{experts}{via})")
    return 0


def load_inputs(path: str | Path) -> dict:
    """The saved processor output as a plain dict of tensors (BatchFeature/BatchEncoding ok)."""
    import torch
    from transformers import BatchEncoding, BatchFeature

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"inputs file does not exist: {path}")
    try:
        with torch.serialization.safe_globals([BatchEncoding, BatchFeature]):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 -- unpickling errors have many types
        raise InputsError(f"{path}: cannot be read as a dict of tensors ({e}); save it with "
                          "torch.save(dict(processor(...)), path)") from None
    data = dict(getattr(obj, "data", obj)) if not isinstance(obj, dict) else dict(obj)
    if "input_ids" not in data:
        raise InputsError(f"{path}: no `input_ids` (keys: {', '.join(sorted(data)) or 'none'})")
    for k, v in data.items():
        if v is not None and not torch.is_tensor(v):
            raise InputsError(f"{path}: `{k}` is a {type(v).__name__}, expected a tensor "
                              "(use return_tensors='pt')")
    return data


def _text(cfg) -> LLMConfig:
    return cfg if isinstance(cfg, LLMConfig) else cfg.text


def check_layout(cfg, tp: int, pp: int, ep: int = 1) -> ParallelConfig:
    """The layout's ranks (EP ranks are data-parallel replicas), checked before any starts;
    MoE models at TP > 1 run with sequence parallelism (megatron's MoE layer needs it)."""
    moe = getattr(_text(cfg), "is_moe", False)
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp * ep,
                         expert_parallel=ep, sequence_parallel=moe and tp > 1)
    validate_layout(_text(cfg), par)
    vision = getattr(cfg, "vision", None)
    heads = getattr(vision, "padded_heads", None) or getattr(vision, "num_heads", None)
    if heads and heads % tp:
        raise ConfigError(f"the vision tower's {heads} (padded) heads do not divide TP={tp}")
    return par


def _padded_to(raw: dict, multiple: int) -> dict:
    """Right-padded to a multiple of `multiple` tokens (sequence parallelism splits the sequence
    over the TP ranks); causal attention keeps the real tokens' logits unchanged."""
    import torch

    ids = raw["input_ids"]
    ids = ids[None] if ids.ndim == 1 else ids
    extra = -ids.shape[1] % multiple
    mask = raw.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else (mask[None] if mask.ndim == 1 else mask)
    return {**raw, "input_ids": torch.cat([ids, ids.new_zeros(ids.shape[0], extra)], 1),
            "attention_mask": torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)}


def _forward_rank(megatron_dir: str, hf_config_dir, par: ParallelConfig, mb: dict,
                  engine: str | None = None, raw_inputs: dict | None = None):
    from eureka_megatron.convert.run import read_conversion
    from eureka_megatron.models.forward import forward_logits
    from eureka_megatron.models.llm import building
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.checkpoint import load_weights

    fam, cfg, _, side = read_conversion(Path(megatron_dir), hf_config_dir)
    init_distributed(par)
    with building(initialize=False):
        chunks = fam.build_chunks(cfg, par)
    load_weights(chunks, megatron_dir)
    (chunk,) = chunks
    chunk.eval()
    if engine is not None:
        return _engine_logits(fam, cfg, chunks, side, raw_inputs)
    logits = forward_logits(chunks, mb, lambda c, b: fam.call(cfg, c, b))
    if logits is None:
        return None
    return logits[..., : _text(cfg).vocab_size].float().cpu()


def _engine_logits(fam, cfg, chunks, side: Path, inputs: dict):
    """Sync the loaded megatron weights into an HF engine (rank 0) and return its logits."""
    import torch
    import torch.distributed as dist

    from eureka_megatron.rollout.hf_engine import HFEngine
    from eureka_megatron.rollout.weight_sync import sync_weights

    engine, layout = None, [None]
    if dist.get_rank() == 0:
        engine = HFEngine.from_config(side, dtype=torch.float32, device="cpu")
        layout = [engine.weight_layout]
    dist.broadcast_object_list(layout, src=0)
    result = sync_weights(chunks, fam.mapping(cfg, layout[0]), engine, version=1)
    if not result.ok:
        raise RuntimeError(f"weight sync into the HF engine failed: {result.error}")
    if engine is None:
        return None
    return engine.logits(**inputs)[..., : _text(cfg).vocab_size].float().cpu()


def run_forward(megatron_dir: str | Path, inputs: str | Path, out: str | Path, tp: int = 1,
                pp: int = 1, hf_config_dir: str | Path | None = None, engine: str | None = None,
                ep: int = 1):
    """Logits of the megatron checkpoint at TP x PP (x EP); with `engine="hf"`, the logits of an
    HF engine after a weight sync from that megatron model (the engine runs the trained weights)."""
    import torch

    from eureka_megatron.convert.run import read_conversion
    from eureka_megatron.runtime.launcher import launch
    from eureka_megatron.trainer.checkpoint import resolve_checkpoint

    if engine is not None and engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: available engines: {', '.join(ENGINES)} "
                          "(SGLang needs a GPU server; see README)")
    megatron_dir = resolve_checkpoint(megatron_dir)
    fam, cfg, _, _ = read_conversion(megatron_dir, hf_config_dir)
    par = check_layout(cfg, tp, pp, ep)
    fam.check_layout(cfg, par)
    raw = load_inputs(inputs)
    width = raw["input_ids"].shape[-1]
    mb = fam.prepare(cfg, _padded_to(raw, tp) if par.sequence_parallel else raw)
    results = launch(_forward_rank, par.nproc, str(megatron_dir), hf_config_dir, par, mb,
                     engine, raw)
    logits = next(r for r in results if r is not None)[..., :width, :]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        torch.save({"logits": logits}, tmp)
    return logits
