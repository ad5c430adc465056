"""`eureka-megatron demo`: a tiny Qwen2.5-VL learns to count with GRPO on a CPU in minutes."""
from __future__ import annotations

import argparse
from pathlib import Path

from eureka_megatron.cli.common import add_overrides, launch_rl, rl_summary
from eureka_megatron.errors import OutputExistsError
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="the CPU demo: a tiny Qwen2.5-VL learns to count with GRPO (<10 min, 2 cores)",
        description="Writes a random tiny Qwen2.5-VL and the in-repo tokenizer, teaches only the "
                    "answer format (stage 0, random answers), then runs GRPO through the real "
                    "megatron actor, HF engine, weight sync and reward pool. Held-out greedy "
                    "accuracy (eval/accuracy in metrics.jsonl) starts near chance (0.2) and "
                    "rises. Config: examples/demo_cpu.yaml.")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    add_overrides(p, "overrides of the demo config")
    p.add_argument("--resume", action="store_true", help="continue a killed demo in --out")
    return p


def run(args) -> int:
    from eureka_megatron.convert.hf_io import HFCheckpoint
    from eureka_megatron.trainer import checkpoint as ckpt
    from eureka_megatron.trainer.loop import describe

    out = Path(args.out)
    cfg = demo_config(out, list(args.overrides))
    if (cfg.checkpoint_dir / ckpt.LATEST).is_file():
        if not args.resume:
            raise OutputExistsError(f"{out} already holds a demo run; pass --resume to continue "
                                    "it or choose another --out")
        cfg.checkpoint.load = str(cfg.checkpoint_dir)
    write_tiny_checkpoint(out / "tiny_init")
    print(f"demo: tiny Qwen2.5-VL ({HFCheckpoint(out / 'tiny_init').num_parameters() / 1e6:.2f}M parameters, "
          f"in-repo tokenizer), counting circles on 2-core-sized budgets; output in {out}")
    print(describe(cfg))
    rl_summary(launch_rl(cfg), cfg)
    return 0
