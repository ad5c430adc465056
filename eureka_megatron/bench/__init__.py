"""Benchmarks behind `eureka-megatron bench`: each prints a markdown table and can write JSON.

Every table starts with what / size / time (s) / throughput / % of bound / bound (see
`report.LEAD`); `all` runs every bench in `ORDER` (not `demo`: minutes per seed).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from eureka_megatron.bench import demo, rewards
from eureka_megatron.bench.report import markdown_table, write_json

ORDER = ["kernels", "step", "sync", "rollout", "convert", "memory", "rewards", "lm-step"]
ABOUT = {"kernels": "fused log-prob + entropy kernel vs the torch reference",
         "step": "one RL step of the real loop: tokens/s, MFU, time split",
         "sync": "Megatron -> HF engine weight sync",
         "rollout": "HF engine generation tokens/s",
         "convert": "HF <-> Megatron checkpoint conversion",
         "memory": "per-rank peak host memory of building the actor and of an HF export",
         "rewards": "reward pool responses/s",
         "lm-step": "Megatron LLM train step at TP1 / TP2 / PP2",
         "demo": "the CPU demo per seed: time to 0.5 / 0.9 held-out accuracy, step split"}


def _benches() -> dict:
    # torch-backed benches: imported on use, so `eureka_megatron.bench` stays torch-free
    from eureka_megatron.bench import convert, kernels, lm_step, memory, rollout, step, sync

    return {"kernels": kernels.run, "step": step.run, "sync": sync.run, "rollout": rollout.run,
            "convert": convert.run, "memory": memory.run, "rewards": rewards.run, "lm-step": lm_step.run,
            "demo": demo.run}


def run_bench(what: str, quick: bool = False, out: Path | None = None, **demo_options) -> int:
    """`demo_options` (seeds, out_dir, overrides) go to `bench demo` only."""
    from eureka_megatron.bench.hardware import describe_machine

    benches = _benches()
    names = ORDER if what == "all" else [what]
    if any(name not in benches for name in names):
        raise ValueError(f"unknown bench {what!r}; expected one of {', '.join(ORDER)}, all")
    machine = describe_machine()
    t_all = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[bench {i}/{len(names)}] {name}{' --quick' if quick else ''}: {ABOUT[name]} ...",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        options = demo_options if name == "demo" else {}
        rows, columns = benches[name](quick=quick, **options)
        print(f"\n### {name} on {machine}\n")
        print(markdown_table(rows, columns), flush=True)
        write_json(out, name, machine, rows)
        print(f"[bench {i}/{len(names)}] {name} took {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    if len(names) > 1:
        print(f"[bench] all {len(names)} benches took {time.perf_counter() - t_all:.0f} s",
              file=sys.stderr, flush=True)
    return 0
