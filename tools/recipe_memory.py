"""Rewrite each cluster recipe's memory table (examples/*.yaml) with what the planner prints for it,
against the hub config.json of its model: the recipes' numbers are the planner's, never hand
arithmetic. `tests/e2e/test_examples.py` fails when a table is stale.

    python tools/recipe_memory.py           # rewrite the tables
    python tools/recipe_memory.py --check   # exit 1 when one is stale
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from eureka_megatron.bench.convert import (INTERNVL2_5_38B, QWEN2_5_VL_7B, QWEN2_5_VL_32B,
                                           QWEN3_VL_32B, QWEN3_VL_235B_A22B, write_config_dir)
from eureka_megatron.config import load_rl_config
from eureka_megatron.trainer.memory_plan import format_plan, plan_memory

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = {"qwen2_5_vl_7b": QWEN2_5_VL_7B, "qwen2_5_vl_32b": QWEN2_5_VL_32B,
           "internvl2_5_38b": INTERNVL2_5_38B, "qwen3_vl_32b": QWEN3_VL_32B,
           "qwen3_vl_235b_a22b": QWEN3_VL_235B_A22B}
MARKER = "# Memory per GPU, as `--dry-run` prints it (python tools/recipe_memory.py writes this table):"


def planner_table(name: str) -> str:
    """The plan `train examples/NAME.yaml --dry-run` prints for the recipe's model."""
    with tempfile.TemporaryDirectory() as tmp:
        hf = write_config_dir(Path(tmp) / "hf", RECIPES[name])
        cfg = load_rl_config(str(EXAMPLES / f"{name}.yaml"), [f"model.hf={hf}"])
        return format_plan(plan_memory(cfg))


def with_table(text: str, table: str) -> str:
    """`text` with the comment block after MARKER replaced by `table`."""
    lines = text.splitlines()
    if MARKER not in lines:
        raise SystemExit(f"no line {MARKER!r} to put the table under")
    start = lines.index(MARKER) + 1
    end = start
    while end < len(lines) and lines[end].startswith("#   "):
        end += 1
    return "\n".join(lines[:start] + ["#   " + t for t in table.splitlines()] + lines[end:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report stale tables (exit 1)")
    args = p.parse_args(argv)
    stale = []
    for name in RECIPES:
        path = EXAMPLES / f"{name}.yaml"
        text = path.read_text()
        new = with_table(text, planner_table(name))
        if new != text:
            stale.append(name)
            if not args.check:
                path.write_text(new)
    verb = "stale" if args.check else "rewritten"
    print(f"{verb}: {', '.join(stale) or 'none'}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
