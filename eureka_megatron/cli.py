"""`eureka-megatron`: the command line.

Every command validates its inputs (config, layout, checkpoint) in this process before any rank
starts, then runs its ranks: under torchrun the current process is one rank; otherwise `--nproc`
(or `parallel.nproc`) ranks are spawned on this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from eureka_megatron import __version__

EPILOG = """\
examples:
  eureka-megatron train-lm examples/tiny_lm.yaml                 # tiny LLM, 1 CPU rank
  eureka-megatron train-lm examples/tiny_lm.yaml parallel.tensor_parallel=2 parallel.nproc=2
  eureka-megatron train-lm examples/tiny_lm.yaml --dry-run       # validate + print the layout
  eureka-megatron train-lm CFG.yaml checkpoint.load=runs/lm      # resume (any TP/PP layout)
  torchrun --nproc-per-node 8 -m eureka_megatron.cli train-lm CFG.yaml parallel.tensor_parallel=8
  eureka-megatron bench lm-step --quick

Config keys are dotted paths into the YAML (model.*, parallel.*, optim.*, train.*,
checkpoint.*); values are parsed as YAML. See README.md for every key.
"""


def _load(args) -> "Config":  # noqa: F821 -- imported lazily to keep --help fast
    from eureka_megatron.config import load_config
    from eureka_megatron.runtime.launcher import under_torchrun

    overrides = list(args.overrides)
    if under_torchrun():
        overrides.append(f"parallel.nproc={os.environ['WORLD_SIZE']}")
    elif args.nproc is not None:
        overrides.append(f"parallel.nproc={args.nproc}")
    return load_config(args.config, overrides)


def cmd_train_lm(args) -> int:
    from eureka_megatron.config import to_dict
    from eureka_megatron.trainer import checkpoint as ckpt

    cfg = _load(args)
    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    p = cfg.parallel
    ckpt.check_run_dir(cfg.checkpoint.dir, cfg.checkpoint.load)
    if cfg.checkpoint.load:
        step_dir = ckpt.resolve_checkpoint(cfg.checkpoint.load)
        say(f"resuming from {step_dir}")
    say(f"layout: {p.describe()}; micro-batches per step: {cfg.num_microbatches}; "
          f"model: {cfg.model.num_parameters() / 1e6:.2f}M parameters "
          f"(vocab {cfg.model.vocab_size} padded to {cfg.model.padded_vocab_size})")
    if args.dry_run:
        say(json.dumps(to_dict(cfg), indent=2))
        return 0
    from eureka_megatron.runtime.launcher import launch
    from eureka_megatron.trainer.lm_run import run_lm

    history = launch(run_lm, p.nproc, cfg, progress=True)[0]
    if history:
        last = history[-1]
        say(f"done: step {last['step']} loss {last['loss']:.4f} "
              f"(first {history[0]['loss']:.4f})" +
              (f"; checkpoints in {cfg.checkpoint.dir}" if cfg.checkpoint.dir else ""))
    return 0


def cmd_bench(args) -> int:
    from eureka_megatron.bench import run_bench

    return run_bench(args.what, quick=args.quick, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eureka-megatron",
        description="Rule-based RL for vision-language reasoning on Megatron-core "
                    "(runs on GPU clusters and, with tiny models, on one CPU).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser(
        "train-lm", help="train the Qwen2.5-family LLM on synthetic token patterns (TP/PP/DP)",
        description="Train the megatron LLM with the real pipeline schedules, distributed "
                    "optimizer and atomic torch_dist checkpoints. Checks the whole megatron "
                    "stack on a machine in seconds.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    t.add_argument("config", nargs="?", help="YAML config (default: built-in tiny model)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    t.add_argument("--nproc", type=int, help="ranks to spawn on this machine (= parallel.nproc)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the config and print the resolved layout; train nothing")
    t.set_defaults(func=cmd_train_lm)

    b = sub.add_parser("bench", help="benchmarks that print markdown tables and write JSON")
    b.add_argument("what", choices=["lm-step", "all"], help="which benchmark")
    b.add_argument("--quick", action="store_true", help="CPU-friendly sizes (well under 4 min)")
    b.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    b.set_defaults(func=cmd_bench)
    return parser


def _split_config_arg(args) -> None:
    """`train-lm a=b` (no YAML file): the first positional is an override, not a file."""
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        args.overrides = [args.config, *args.overrides]
        args.config = None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    _split_config_arg(args)
    from eureka_megatron.config import ConfigError
    from eureka_megatron.runtime.launcher import RankError
    from eureka_megatron.trainer.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ConfigError, CheckpointError) as e:
        print(f"eureka-megatron: error: {e}", file=sys.stderr)
        return 2
    except RankError as e:
        print(f"eureka-megatron: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
