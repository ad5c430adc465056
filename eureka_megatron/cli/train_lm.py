"""`eureka-megatron train-lm`: the megatron LLM on synthetic token patterns, at any TP/PP/DP."""
from __future__ import annotations

import argparse
import json

from eureka_megatron.cli.common import add_overrides, say, with_nproc
from eureka_megatron.config import load_config, to_dict

EPILOG = """\
examples:
  eureka-megatron train-lm examples/tiny_lm.yaml                 # tiny LLM, 1 CPU rank
  eureka-megatron train-lm examples/tiny_lm.yaml parallel.tensor_parallel=2 parallel.nproc=2
  eureka-megatron train-lm examples/tiny_lm.yaml --dry-run       # validate + print the layout
  eureka-megatron train-lm CFG.yaml checkpoint.load=runs/lm      # resume (any TP/PP layout)
  torchrun --nproc-per-node 8 -m eureka_megatron.cli train-lm CFG.yaml parallel.tensor_parallel=8

Config sections: model, parallel, optim, train, checkpoint (README.md lists every key).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train-lm", help="train the Qwen2.5-family LLM on synthetic token patterns (TP/PP/DP)",
        description="Train the megatron LLM with the real pipeline schedules, distributed "
                    "optimizer and atomic torch_dist checkpoints. Checks the whole megatron "
                    "stack on a machine in seconds.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", help="YAML config (default: built-in tiny model)")
    add_overrides(p)
    p.add_argument("--nproc", type=int, help="ranks to spawn on this machine (= parallel.nproc)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the resolved layout; train nothing")
    return p


def run(args) -> int:
    from eureka_megatron.runtime.launcher import launch
    from eureka_megatron.trainer import checkpoint as ckpt
    from eureka_megatron.trainer.lm_run import run_lm

    cfg = load_config(args.config, with_nproc(args.overrides, args.nproc))
    p = cfg.parallel
    ckpt.check_run_dir(cfg.checkpoint.dir, cfg.checkpoint.load)
    if cfg.checkpoint.load:
        say(f"resuming from {ckpt.resolve_checkpoint(cfg.checkpoint.load)}")
    say(f"layout: {p.describe()}; micro-batches per step: {cfg.num_microbatches}; "
        f"model: {cfg.model.num_parameters() / 1e6:.2f}M parameters "
        f"(vocab {cfg.model.vocab_size} padded to {cfg.model.padded_vocab_size})")
    if args.dry_run:
        say(json.dumps(to_dict(cfg), indent=2))
        return 0
    history = launch(run_lm, p.nproc, cfg, progress=True)[0]
    if history:
        last = history[-1]
        say(f"done: step {last['step']} loss {last['loss']:.4f} (first {history[0]['loss']:.4f})"
            + (f"; checkpoints in {cfg.checkpoint.dir}" if cfg.checkpoint.dir else ""))
    return 0
