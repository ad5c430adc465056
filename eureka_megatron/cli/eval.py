"""`eureka-megatron eval`: greedy accuracy and pass@k of a checkpoint; the flags fill an
`EvalRunConfig`, typed and validated like a training config."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from eureka_megatron.evaluate import ENGINES, EvalRunConfig, load_eval_config, markdown, run_eval
from eureka_megatron.config import DEFAULT_REWARD

EPILOG = """\
examples:
  eureka-megatron eval --model runs/demo/hf_final --data runs/demo/data/heldout-*/data.jsonl
  eureka-megatron eval --model ckpt/Qwen2.5-VL-7B-Instruct --data mmk12_test.jsonl \\
      --engine sglang --tp 2 --samples 8 --max-new-tokens 4096 --out evals/qwen7b-mmk12
  eureka-megatron eval --model runs/rl/checkpoints --hf-config ckpt/Qwen2.5-VL-7B-Instruct \\
      --data mathvista.jsonl mathverse.jsonl            # newest training step; one source per file

Output: OUT/results.json (overall + by_source), OUT/results.md (the table printed here) and
OUT/samples.jsonl (every response with its scores). The breakdown uses the rows' source, data_source,
dataset, category, subject or task field (--group-by picks another), else one row per --data file.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="greedy accuracy and pass@k of an HF or megatron checkpoint on JSONL sets",
        description="Generate with a rollout engine (greedy, plus --samples draws at "
                    "--temperature) and grade every response with the rule-based judge the "
                    "rewards use. Reports greedy accuracy and format rate, pass@1 and pass@k "
                    "(unbiased estimator), response length and the share cut at "
                    "--max-new-tokens, overall and per source. Rows in any training format "
                    "(MM-Eureka qwen/internvl, plain); bad rows are skipped and counted.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--model", required=True,
                   help="HF checkpoint dir, or megatron: converted dir, step_* dir or run dir")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE.jsonl",
                   help="one or more JSONL files (several: one source each)")
    p.add_argument("--engine", choices=ENGINES, default="hf",
                   help="hf: transformers in this process (CPU or one GPU); sglang: launch a "
                        "server (--tp GPUs) or use --sglang-url")
    p.add_argument("--samples", type=int, default=1, metavar="K",
                   help="K >= 2 also draws K samples per prompt and reports pass@1 and pass@K")
    p.add_argument("--temperature", type=float, default=1.0, help="for the K samples (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="for the K samples (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="per response (default 1024)")
    p.add_argument("--out", default=None, help="output dir (default: runs/eval/MODEL__DATA)")
    p.add_argument("--hf-config", default=None,
                   help="megatron checkpoints: dir with config.json + tokenizer (default: MODEL/hf)")
    p.add_argument("--group-by", default=None, metavar="FIELD",
                   help="row field for the per-source breakdown (default: auto)")
    p.add_argument("--system-prompt", default="r1",
                   help="'r1' (MM-Eureka's reasoning prompt, the default), 'none', or the text")
    p.add_argument("--judge", default=DEFAULT_REWARD, metavar="MODULE:FUNCTION",
                   help="reward function returning {'accuracy': 0|1, 'format': 0|1}")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N usable rows")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    p.add_argument("--max-prompt-length", type=int, default=8192, help="longer prompts are skipped")
    p.add_argument("--sglang-url", default=None, help="a running SGLang server serving MODEL")
    p.add_argument("--tp", type=int, default=1, help="GPUs of a launched SGLang server")
    p.add_argument("--workers", type=int, default=2, help="judge worker processes")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_of(args) -> EvalRunConfig:
    """The flags as an EvalRunConfig: each flag is the field of the same name."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRunConfig)
              if hasattr(args, f.name)}
    values["progress"] = not args.quiet
    if values["system_prompt"] == "none":
        values["system_prompt"] = None
    return load_eval_config(values)


def run(args) -> int:
    cfg = config_of(args)
    results = run_eval(cfg)
    print(markdown(results))
    skipped = f", {results['skipped_rows']} row(s) skipped" if results["skipped_rows"] else ""
    print(f"\n{results['overall']['n']} prompts in {results['seconds']:.1f}s{skipped}; "
          f"wrote {Path(cfg.out)}/results.json, results.md, samples.jsonl")
    return 0
