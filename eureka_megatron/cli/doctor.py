"""`eureka-megatron doctor`: the acceptance run of a new machine (checks: bench/doctor.py).

Every check is described here, with the parser, so `--help` stays torch-free."""
from __future__ import annotations

import argparse
from pathlib import Path

CHECKS_HELP = """\
checks (one table row each, or several; status ok / FAIL / skipped with the reason):
  versions      torch, CUDA, NCCL, triton, megatron-core, transformers, transformer-engine,
                sglang, DALI, liger-kernel. An optional package that is missing is skipped (with
                what is used instead); one that is installed but does not import on a GPU
                machine FAILs.
  matmul peak   measured dense matmul TFLOP/s: bf16 8192^3 on the GPU, fp32 1024^3 on CPU; the
                bound of the kernel speed and train-step rows.
  kernels       the Triton kernels (fused log-prob + entropy, policy loss), compiled on GPU,
                interpreted on CPU (TRITON_INTERPRET=1), forward + backward in fp32 and bf16,
                against the torch reference in float64 on the same rounded inputs: values within
                1e-5 relative, gradients within 1e-5 (fp32) / 1.6e-2 (bf16). GPU: T x H x V =
                2048 x 1024 x 32768 (32000 real) and B x L = 64 x 2048; CPU / --small:
                48 x 32 x 200 (190 real) and 8 x 48.
  kernel speed  GPU only: `bench kernels` -- fused log-prob kernel vs the torch reference (and
                Liger when installed), fwd and fwd+bwd, bf16, at T=16384, H=5120, V=152064 and
                V/8 (one TP=8 shard), as % of the measured matmul peak. --small: 512 x 256 x 8192.
  train step    a megatron train step (distributed optimizer, real schedule) on synthetic token
                patterns. GPU: a Qwen2.5-1.5B-shaped LLM (1.5B params) in bf16 with the
                transformer-engine layer spec when TE imports, 8 x 2048 tokens, 3 steps (the last
                reported: tokens/s, MFU). CPU: bench lm-step's 10.1M-param model in fp32
                (local spec), 4 x 128 tokens, 2 steps; --small on a GPU: that model in bf16.
                FAILs on a non-finite loss or grad-norm.
  engine sync   the trained weights synced into a fresh HF engine (empty weights), which samples
                from a prompt; the trainer scores the same tokens with the fused log-prob kernel
                (compiled on GPU; its torch backend on CPU, as CPU training uses). Reports max /
                mean |trainer - engine log-prob|: fp32 (CPU) max within 1e-4 (the numerical
                contract); bf16 vs bf16 (GPU) mean within 0.05. GPU: 8 samples x 128 new tokens
                from a 32-token prompt; CPU / --small: 4 x 16 from 16.
  all-reduce    with 2+ GPUs: NCCL all-reduce bus bandwidth of 1 GiB fp32 (--small: 64 MiB)
                over every GPU (skipped with fewer).

sizes: with a GPU the sizes above (meant to take under 10 minutes on one GPU); without one, or
with --small, the small sizes (well under a minute on 2 CPU cores). Exit code 1 if any check
FAILs.

examples:
  eureka-megatron doctor                          # the table on stdout
  eureka-megatron doctor --out doctor.json        # and the rows as JSON (key "doctor")
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "doctor", help="acceptance run of this machine: versions, kernels, train step, sync",
        description="Checks that every part eureka-megatron depends on works on this machine and "
                    "measures it against its bound. A failing check is recorded in one line and "
                    "the others still run.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECKS_HELP)
    p.add_argument("--small", action="store_true",
                   help="the small (CPU) sizes even on a GPU: a quick smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="also write the rows as JSON here (merged under the key \"doctor\")")
    return p


def run(args) -> int:
    from eureka_megatron.bench.doctor import run_doctor  # torch

    return run_doctor(small=args.small, out=args.out)
