"""`eureka-megatron`: the command line, one module per command (`add_parser` + `run`).

Every command validates its inputs (config, layout, checkpoint) in this process before any rank
starts, then runs its ranks: under torchrun the current process is one rank; otherwise `train-lm
--nproc` (or `parallel.nproc`) ranks are spawned on this machine, and `forward --tp/--pp` spawns
TP x PP. Importing this package pulls no torch, so `--help` and config errors are instant.
"""
from __future__ import annotations

import argparse
import sys

from eureka_megatron import __version__
from eureka_megatron.cli import bench, convert, demo, doctor, eval, forward, train, train_lm
from eureka_megatron.cli.common import split_config_arg
from eureka_megatron.errors import UserError
from eureka_megatron.runtime.errors import RankError

COMMANDS = (train_lm, train, demo, convert, forward, eval, bench, doctor)

EPILOG = """\
examples:
  eureka-megatron demo                                           # the CPU RL demo (< 10 min)
  eureka-megatron train examples/demo_cpu.yaml model.hf=DIR --dry-run
  eureka-megatron train-lm examples/tiny_lm.yaml                 # tiny LLM, 1 CPU rank
  eureka-megatron train-lm examples/tiny_lm.yaml parallel.tensor_parallel=2 parallel.nproc=2
  eureka-megatron train-lm examples/tiny_lm.yaml --dry-run       # validate + print the layout
  eureka-megatron train-lm CFG.yaml checkpoint.load=runs/lm      # resume (any TP/PP layout)
  torchrun --nproc-per-node 8 -m eureka_megatron.cli train-lm CFG.yaml parallel.tensor_parallel=8
  eureka-megatron convert hf-to-megatron --hf Qwen2.5-VL-7B-Instruct --out ckpt/qwen25vl7b
  eureka-megatron forward --megatron ckpt/qwen25vl7b --inputs in.pt --out out.pt --tp 2 --pp 2
  eureka-megatron forward --megatron runs/x/step_00000100 --inputs in.pt --out e.pt --tp 2 --engine hf
  eureka-megatron convert megatron-to-hf --megatron runs/x/step_00000100 --out hf_out
  eureka-megatron eval --model runs/demo/hf_final --data heldout.jsonl --samples 8   # accuracy, pass@8
  eureka-megatron bench all --quick                              # every benchmark table, CPU sizes
  eureka-megatron bench lm-step --quick
  eureka-megatron bench rewards --quick                          # reward pool responses/s
  eureka-megatron bench sync                                     # Megatron -> engine weight sync GB/s
  eureka-megatron doctor --out doctor.json                       # acceptance run of this machine

Config keys are dotted paths into the YAML (model.*, parallel.*, optim.*, train.*,
checkpoint.*, algo.*, rewards.*); values are parsed as YAML. See README.md for every key.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eureka-megatron",
        description="Rule-based RL for vision-language reasoning on Megatron-core "
                    "(runs on GPU clusters and, with tiny models, on one CPU).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 2 on input the user can fix (the message, no traceback), 1 when a rank
    failed (its traceback); any other exception is a bug and keeps its traceback."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `bench demo --seeds 1,2 train.steps=300`: overrides after the options
        if getattr(args, "command", None) == "bench" and all(
                "=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        parser.print_help()
        return 0
    split_config_arg(args)
    try:
        return args.func(args)
    except UserError as e:
        print(f"eureka-megatron: error: {e}", file=sys.stderr)
        return 2
    except RankError as e:
        print(f"eureka-megatron: {e}", file=sys.stderr)
        return 1
