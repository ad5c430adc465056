"""`eureka-megatron train`: the RL loop from an HF checkpoint (GRPO family, rule-based rewards)."""
from __future__ import annotations

import argparse
from pathlib import Path

from eureka_megatron.cli.common import add_overrides, launch_rl, rl_summary, say, with_nproc
from eureka_megatron.config import ConfigError
from eureka_megatron.config import load_rl_config

EPILOG = """\
examples:
  eureka-megatron demo --out runs/demo                           # the CPU demo (< 10 min)
  eureka-megatron train examples/qwen2_5_vl_7b.yaml --dry-run    # validate + print the layout
  eureka-megatron train CFG.yaml model.hf=ckpt/Qwen2.5-VL-7B-Instruct parallel.nproc=8 \\
      parallel.tensor_parallel=4 rollout.engine=sglang
  eureka-megatron train CFG.yaml --resume                        # continue a killed run
  eureka-megatron train CFG.yaml cluster.launcher=ray cluster.address=auto   # on a Ray cluster

Sections: model, parallel, optim, train, rollout, algo, rewards, data, eval, warmup,
checkpoint, cluster, output (README.md lists every key).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train", help="RL-train a VLM (GRPO family, rule-based rewards) from an HF checkpoint",
        description="The MM-Eureka-style RL loop on megatron: rollout (HF engine on CPU, SGLang "
                    "on GPU) -> rule-based rewards -> online filter -> log-probs -> advantages -> "
                    "train -> weight sync -> metrics -> checkpoint. Writes OUTPUT.DIR/"
                    "metrics.jsonl, tensorboard/, PNG plots, summary.md and checkpoints; a killed "
                    "run resumes with --resume (or checkpoint.load=DIR).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("config", nargs="?", help="YAML config (see examples/)")
    add_overrides(p)
    p.add_argument("--dry-run", action="store_true",
                   help="load and validate the config, print the resolved layout and the memory "
                        "plan per GPU, train nothing")
    p.add_argument("--ignore-memory", action="store_true",
                   help="go on although the memory plan does not fit cluster.gpu_memory_gb")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in the run's checkpoint directory")
    return p


def run(args) -> int:
    from eureka_megatron.trainer import checkpoint as ckpt
    from eureka_megatron.trainer.loop import describe
    from eureka_megatron.trainer.memory_plan import check_plan

    cfg = load_rl_config(args.config, with_nproc(args.overrides))
    if args.resume and not cfg.checkpoint.load:
        if (cfg.checkpoint_dir / ckpt.LATEST).is_file():
            cfg.checkpoint.load = str(cfg.checkpoint_dir)
        else:
            say(f"--resume: no checkpoint in {cfg.checkpoint_dir} yet; starting fresh")
    if not (cfg.model.hf_dir / "config.json").is_file():
        raise ConfigError(f"{cfg.model.hf_dir}: no config.json there (model.hf: an HF checkpoint "
                          "directory; model.megatron: its HF side files in hf/ or model.hf)")
    ckpt.check_run_dir(cfg.checkpoint_dir, cfg.checkpoint.load)
    if cfg.checkpoint.load:
        say(f"resuming from {ckpt.resolve_checkpoint(cfg.checkpoint.load)}")
    say(describe(cfg))
    check_plan(cfg, ignore=args.ignore_memory, report=say)
    if args.dry_run:
        return 0
    rl_summary(launch_rl(cfg), cfg)
    return 0
