"""`eureka-megatron bench`: benchmarks that print markdown tables and write JSON."""
from __future__ import annotations

import argparse
from pathlib import Path

from eureka_megatron.bench import run_bench
from eureka_megatron.errors import UserError

EPILOG = """\
examples:
  eureka-megatron bench all --quick --out bench.json             # every table, CPU sizes
  eureka-megatron bench step                                     # one RL step: tokens/s, MFU, split
  eureka-megatron bench kernels --out bench.json                 # real shapes when a GPU is present
  eureka-megatron bench demo --seeds 1234,1,2,3,4 --runs runs/bench-demo   # the demo per seed
  eureka-megatron bench perf-model                               # the cluster recipes' step on paper
  eureka-megatron bench perf-model examples/qwen2_5_vl_7b.yaml mean_response_tokens=1200 --mfu 0.3
"""
WHAT = ["kernels", "step", "sync", "rollout", "convert", "memory", "rewards", "lm-step", "demo",
        "perf-model", "all"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="benchmarks that print markdown tables and write JSON",
        description="Each benchmark prints a markdown table (what, size, time, throughput, % of "
                    "the relevant hardware bound: measured matmul peak, memory-copy bandwidth or "
                    "in-line scoring) and, with --out, merges its rows into a JSON file. Without "
                    "a GPU the sizes are CPU-sized; --quick makes them smaller still.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("what", choices=WHAT,
                   help="kernels: fused log-prob kernel; step: one RL step (tokens/s, MFU, time "
                        "split); sync: Megatron -> engine weights; rollout: engine generation; "
                        "convert: HF <-> megatron; memory: per-rank peak host memory of building "
                        "the actor (HF or megatron source) and of an HF export at TP1/2/4; "
                        "rewards: reward pool; lm-step: megatron LLM "
                        "train step at TP/PP; demo: the CPU demo once per seed (time to 0.5 / 0.9 "
                        "held-out accuracy, final/best, step split; ~5 min a seed); perf-model: "
                        "ON PAPER, nothing run -- each recipe's step time per phase and tokens/s/GPU "
                        "predicted from FLOPs and bytes on H100s (CONFIG ... default: the cluster "
                        "recipes in examples/); all: every one but demo and perf-model")
    p.add_argument("--quick", action="store_true",
                   help="CPU-friendly sizes (`bench all --quick` < 4 min on 2 cores)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=None,
                   help="bench demo: comma-separated train.seed values (default 1234,1,2,3,4; "
                        "--quick: the first, 60 steps)")
    p.add_argument("--runs", type=Path, default=None,
                   help="bench demo: directory for the runs (default: a new temporary one)")
    p.add_argument("--mfu", type=float, default=None,
                   help="bench perf-model: the MFU of the log-prob and training passes (default 0.4)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="bench demo: overrides of the demo config, e.g. train.steps=300; bench "
                        "perf-model: recipe YAMLs (before any --option), section.key=value "
                        "overrides of every recipe, and NAME=VALUE assumptions (the table "
                        "it prints lists them), e.g. mean_response_tokens=1200")
    return p


def run(args) -> int:
    if args.what == "perf-model":
        # builds the recipes' models on the meta device: torch, kept out of the CLI's start
        from eureka_megatron.bench import perf_recipes

        return perf_recipes.run(args.overrides, mfu=args.mfu, out=args.out)
    if args.mfu is not None:
        raise UserError("--mfu is an option of `bench perf-model`")
    options = {}
    if args.what == "demo":
        options = {"seeds": args.seeds, "out_dir": args.runs, "overrides": args.overrides}
    elif args.seeds or args.runs or args.overrides:
        raise UserError("--seeds, --runs and key=value overrides are options of `bench demo`")
    return run_bench(args.what, quick=args.quick, out=args.out, **options)
