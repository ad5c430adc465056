"""`bench lm-step`: tokens/s, memory and MFU of the megatron LLM train step at TP1/TP2/PP2, and
of a Mixture-of-Experts version of the same model with its experts on one rank (EP1) and split
over two (EP2, the all-to-all dispatcher; DP2).

Every layout trains the same ~10M-parameter model (CPU) or ~1B-parameter model (GPU) from the
same weights on the same batches; steps after the warm-up are timed and the median is reported.
The MoE model replaces each MLP by 8 experts of a quarter of its width, top 2 (half the dense
MLP's active parameters); MFU counts the active parameters.
CPU: sequences of 256 tokens, 4 per step, 8 steps (2 warm-up); `--quick`: 128 tokens, 3 steps (1).
"""
from __future__ import annotations

import dataclasses
import resource
import statistics

import torch

from eureka_megatron.bench.hardware import matmul_peak_tflops
from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.config import Config, OptimConfig, ParallelConfig, TrainConfig
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.lm_run import run_lm

CPU_MODEL = LLMConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4)
CPU_MOE_MODEL = dataclasses.replace(CPU_MODEL, num_experts=8, moe_intermediate_size=176,
                                    num_experts_per_tok=2)
GPU_MODEL = LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      tie_word_embeddings=True)  # Qwen2.5-1.5B's shape (~1.5B parameters)


def flops_per_token(m: LLMConfig, seq: int) -> float:
    """Training FLOPs per token: 6 x the parameters a token multiplies (output layer included; a
    MoE's router and k experts, not all of them) + attention scores."""
    n = m.num_active_parameters() - m.vocab_size * m.hidden_size * (0 if m.tie_word_embeddings else 1)
    attn = 12 * m.num_hidden_layers * m.num_attention_heads * m.kv_channels * seq
    return 6 * n + attn


def host_peak_gib() -> float:
    """This process's peak RSS: VmHWM (of this process image only), else ru_maxrss -- which on
    Linux a spawned rank inherits from its launcher's peak over fork + exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rank(cfg: Config, warmup: int) -> dict:
    history = run_lm(cfg)
    timed = history[warmup:]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = host_peak_gib()
    return {"tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "seconds": statistics.median(m["seconds"] for m in timed),
            "loss": history[-1]["loss"], "peak_gib": peak}


def run(quick: bool = False) -> tuple[list[dict], list[str]]:

    gpu = torch.cuda.is_available()
    seq = 2048 if gpu else (128 if quick else 256)
    n_gpus = torch.cuda.device_count() if gpu else 0
    dense = GPU_MODEL if gpu else CPU_MODEL
    layouts = [(dense, tp, pp, 1) for tp, pp in
               ([(1, 1)] if gpu and n_gpus < 2 else [(1, 1), (2, 1), (1, 2)])]
    if not gpu:  # the MoE model: experts whole, then over EP2 (DP2)
        layouts += [(CPU_MOE_MODEL, 1, 1, 1), (CPU_MOE_MODEL, 1, 1, 2)]
    steps, warmup = (3, 1) if quick else (8, 2)
    peak_tflops = matmul_peak_tflops()
    rows = []
    for model, tp, pp, ep in layouts:
        nproc = tp * pp * ep
        cfg = Config(
            model=model,
            parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=nproc, bf16=gpu,
                                    expert_parallel=ep),
            optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=1),
            train=TrainConfig(steps=steps, seq_length=seq, micro_batch_size=1,
                              global_batch_size=8 if gpu else 4),
        ).validate()
        res = launch(_rank, nproc, cfg, warmup)
        r0 = max(res, key=lambda r: r["peak_gib"])
        tflops = res[0]["tokens_per_s"] * flops_per_token(model, seq) / 1e12
        bound = peak_tflops * (nproc if gpu else 1)  # CPU ranks share one machine's cores
        tokens_step = cfg.train.global_batch_size * seq
        kind = (f"MoE {model.num_experts}x{model.expert_ffn} top {model.num_experts_per_tok} "
                f"EP{ep}" if model.is_moe else f"TP{tp} PP{pp}")
        rows.append({
            **lead(f"megatron LLM train step {kind}",
                   f"{model.num_parameters() / 1e6:.1f}M params, {tokens_step} tokens/step",
                   res[0]["seconds"], res[0]["tokens_per_s"], "tokens/s", 100 * tflops / bound,
                   f"measured {'bf16' if gpu else 'fp32'} matmul peak {bound:.3g} TFLOP/s"
                   + (f" ({nproc} GPUs)" if gpu else "")),
            "layout": kind, "ranks": nproc,
            "params (M)": round(model.num_parameters() / 1e6, 1),
            "tokens/step": cfg.train.global_batch_size * seq,
            "step (s)": round(res[0]["seconds"], 3), "tokens/s": round(res[0]["tokens_per_s"], 1),
            "TFLOP/s": round(tflops, 4), "% of matmul peak (MFU)": round(100 * tflops / bound, 1),
            "peak mem/rank (GiB)": round(r0["peak_gib"], 2),
        })
    return rows, LEAD + ["ranks", "TFLOP/s", "peak mem/rank (GiB)"]
