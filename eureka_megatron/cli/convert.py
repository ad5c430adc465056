"""`eureka-megatron convert`: HF <-> megatron torch_dist checkpoints, one tensor at a time."""
from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  eureka-megatron convert hf-to-megatron --hf Qwen/Qwen2.5-VL-7B-Instruct --out ckpt/vl7b
  eureka-megatron convert hf-to-megatron --hf InternVL2_5-38B --out ckpt/ivl38b --dtype bf16
  eureka-megatron convert megatron-to-hf --megatron ckpt/vl7b --out vl7b_hf
  eureka-megatron convert megatron-to-hf --megatron runs/rl/step_00000200 --hf-config ckpt/vl7b/hf --out rl_hf

Supported model_type values: qwen2, qwen2_5_vl, internvl_chat (original InternVL format, Qwen2 or
InternLM2 LLM), internvl (transformers-native InternVL). Layouts read: hub on-disk names,
transformers >= 4.52 in-memory names, internvl_chat, HF-native InternVL.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert", help="HF <-> megatron torch_dist checkpoints (Qwen2.5, Qwen2.5-VL, InternVL)",
        description="Convert checkpoints, streaming one tensor at a time. Every HF tensor must "
                    "map and every megatron tensor must be produced with the shape the config "
                    "implies, or nothing is written. The megatron side loads at any TP/PP; "
                    "converting back writes the source's naming layout with its config, "
                    "tokenizer and processor files.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    directions = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    h2m = directions.add_parser("hf-to-megatron", help="HF safetensors dir -> torch_dist dir")
    h2m.add_argument("--hf", required=True, type=Path, help="HF checkpoint directory")
    m2h = directions.add_parser("megatron-to-hf",
                                help="torch_dist dir (converted or trained) -> HF dir")
    m2h.add_argument("--megatron", required=True, type=Path,
                     help="a converted dir or a training step_* dir")
    m2h.add_argument("--hf-config", type=Path, default=None,
                     help="dir with config.json + tokenizer files (default: MEGATRON/hf)")
    m2h.add_argument("--layout", default=None,
                     help="HF naming to write (default: the source's, from conversion.json)")
    for direction in (h2m, m2h):
        direction.add_argument("--out", required=True, type=Path,
                               help="output directory (created)")
        direction.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                               help="cast floating-point tensors (default: keep the source's)")
        direction.add_argument("--force", action="store_true", help="replace a non-empty --out")
        direction.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from eureka_megatron.convert.run import hf_to_megatron, megatron_to_hf

    if args.direction == "hf-to-megatron":
        info = hf_to_megatron(args.hf, args.out, dtype=args.dtype, force=args.force,
                              progress=not args.quiet)
        print(f"wrote {args.out}: {info['family']} ({info['layout']} layout), "
              f"{info['hf_tensors']} HF tensors -> {info['tensors']} megatron tensors, "
              f"{info['bytes'] / 2**30:.2f} GiB {info['dtype']}, {info['seconds']:.1f}s")
    else:
        info = megatron_to_hf(args.megatron, args.out, dtype=args.dtype, layout=args.layout,
                              hf_config_dir=args.hf_config, force=args.force,
                              progress=not args.quiet)
        print(f"wrote {args.out}: {info['family']} ({info['layout']} layout), "
              f"{info['tensors']} tensors, {info['bytes'] / 2**30:.2f} GiB, {info['seconds']:.1f}s")
    return 0
