"""What several commands share: rank-0 printing, the nproc override, launching the RL loop.

Modules that pull torch are imported inside the functions, so the parser stays torch-free."""
from __future__ import annotations

import os
from pathlib import Path

from eureka_megatron.runtime.layout import plan_layout
from eureka_megatron.runtime.placement import launch_on_ray, ray_init


def say(*args, **kwargs) -> None:
    """print, on rank 0 only (under torchrun every rank runs the command)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs)


def with_nproc(overrides: list[str], nproc: int | None = None) -> list[str]:
    """The config overrides plus `parallel.nproc`: torchrun's world size, else --nproc."""
    from eureka_megatron.runtime.launcher import under_torchrun

    if under_torchrun():
        return [*overrides, f"parallel.nproc={os.environ['WORLD_SIZE']}"]
    if nproc is not None:
        return [*overrides, f"parallel.nproc={nproc}"]
    return list(overrides)


def split_config_arg(args) -> None:
    """`train-lm a=b` (no YAML file): the first positional is an override, not a file."""
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def add_overrides(parser, what: str = "dotted config overrides") -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=what)


def launch_rl(cfg) -> list[dict]:
    """Run the RL loop on the configured launcher: spawned local ranks, or a Ray placement group."""
    from eureka_megatron.runtime.launcher import launch
    from eureka_megatron.trainer.loop import run_rl

    if cfg.cluster.launcher == "ray":
        ray_init(cfg.cluster.address)
        # The HF engine lives inside rank 0's process; only SGLang servers need GPUs of their own.
        engines = cfg.rollout.engines if cfg.rollout.engine == "sglang" else 0
        layout = plan_layout(actor_world=cfg.parallel.nproc, engines=engines,
                             gpus_per_engine=cfg.rollout.gpus_per_engine,
                             colocate=cfg.cluster.colocate and engines > 0, use_gpus=has_gpu(),
                             gpus_per_node=cfg.cluster.gpus_per_node)
        return launch_on_ray(run_rl, cfg.parallel.nproc, cfg, layout=layout)[0]
    return launch(run_rl, cfg.parallel.nproc, cfg, timeout=7 * 24 * 3600.0)[0]


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def rl_summary(history: list[dict], cfg) -> None:
    """The held-out accuracy curve in one line, and where the run wrote everything."""
    evals = [h for h in history if h.get("eval/accuracy") is not None]
    if evals:
        best = max(evals, key=lambda h: h["eval/accuracy"])
        hit = next((h["step"] for h in evals if h["eval/accuracy"] >= 0.9), None)
        say(f"held-out greedy accuracy: {evals[0]['eval/accuracy']:.3f} (step {evals[0]['step']}) "
            f"-> {evals[-1]['eval/accuracy']:.3f} (step {evals[-1]['step']}); best "
            f"{best['eval/accuracy']:.3f} (step {best['step']})"
            + (f"; >= 0.9 first at step {hit}" if hit is not None else ""))
    say(f"run directory: {cfg.output.dir} (metrics.jsonl, tensorboard/, *.png, summary.md, "
        f"checkpoints in {cfg.checkpoint_dir})")
