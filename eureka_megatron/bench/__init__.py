"""Benchmarks behind `eureka-megatron bench`: each prints a markdown table and can write JSON."""
from __future__ import annotations

from pathlib import Path


def run_bench(what: str, quick: bool = False, out: Path | None = None) -> int:
    from eureka_megatron.bench import convert, kernels, lm_step, rewards, sync
    from eureka_megatron.bench.hardware import describe_machine
    from eureka_megatron.bench.report import markdown_table, write_json

    benches = {"lm-step": lm_step.run, "kernels": kernels.run, "convert": convert.run,
               "rewards": rewards.run, "sync": sync.run}
    names = list(benches) if what == "all" else [what]
    machine = describe_machine()
    for name in names:
        rows, columns = benches[name](quick=quick)
        print(f"\n### {name} on {machine}\n")
        print(markdown_table(rows, columns), flush=True)
        write_json(out, name, machine, rows)
    return 0
