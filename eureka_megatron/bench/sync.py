"""`bench sync`: one full weight sync, Megatron shards -> HF-named buckets -> a rollout engine.

Reports seconds and GB/s of the HF tensor bytes delivered, next to the bound: this machine's
memory-copy bandwidth (every byte is copied at least once into the engine's parameters). CPU: a
~1B-parameter Qwen2-shaped model (bf16) at TP1 and TP2 into the HF engine; GPU: Qwen2.5-7B's
shape. The first sync warms up; the second is timed.
"""
from __future__ import annotations

import time

import torch

from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.config import ParallelConfig
from eureka_megatron.models.llm import build_llm_chunks
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.qwen2.hf import qwen2_mapping
from eureka_megatron.rollout.hf_engine import HFEngine
from eureka_megatron.rollout.weight_sync import sync_weights
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.runtime.launcher import launch

CPU_MODEL = LLMConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5504,
                      num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=4)
QUICK_MODEL = LLMConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
GPU_MODEL = LLMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)


def hf_qwen2_config(m: LLMConfig) -> dict:
    """The transformers Qwen2 config of our LLM config."""
    return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=m.vocab_size,
                hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
                num_key_value_heads=m.num_key_value_heads, rms_norm_eps=m.rms_norm_eps,
                max_position_embeddings=m.max_position_embeddings,
                tie_word_embeddings=m.tie_word_embeddings, rope_theta=m.rope_theta)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Best-of-3 GB/s of one tensor copy (read + write counted once, as the sync's bytes are)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(4):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _rank(model: LLMConfig, par: ParallelConfig, bucket_bytes: int):
    init_distributed(par)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    chunks = [c.to(torch.bfloat16) for c in build_llm_chunks(model, par)]
    engine = None
    if torch.distributed.get_rank() == 0:
        engine = HFEngine.from_config(hf_qwen2_config(model), dtype=torch.bfloat16, device=dev)
    mapping = qwen2_mapping(model, "model.", "lm_head.weight")
    results = [sync_weights(chunks, mapping, engine, version, bucket_bytes=bucket_bytes)
               for version in (1, 2)]
    if engine is None:
        return None
    assert engine.weight_version == 2 and all(r.ok for r in results)
    return results[-1]


def run(quick: bool = False) -> tuple[list[dict], list[str]]:

    gpu = torch.cuda.is_available()
    model = GPU_MODEL if gpu else (QUICK_MODEL if quick else CPU_MODEL)
    layouts = [1] if gpu and torch.cuda.device_count() < 2 else [1, 2]
    bound = copy_bandwidth_gbs(256 << 20 if quick else 1 << 30)
    rows = []
    for tp in layouts:
        par = ParallelConfig(tensor_parallel=tp, nproc=tp)
        res = next(r for r in launch(_rank, tp, model, par, 512 << 20) if r is not None)
        name = f"Qwen2-shaped {model.num_parameters() / 1e9:.2f}B bf16"
        rows.append({
            **lead(f"weight sync TP{tp} -> hf engine", f"{name}, {res.bytes / 1e9:.3g} GB",
                   res.seconds, res.gb_per_s, "GB/s", 100 * res.gb_per_s / bound,
                   f"memory copy {bound:.3g} GB/s"),
            "model": name,
            "layout": f"TP{tp}", "engine": "hf", "tensors": res.tensors,
            "GB": round(res.bytes / 1e9, 3), "sync (s)": round(res.seconds, 3),
            "GB/s": round(res.gb_per_s, 2), "copy bound GB/s": round(bound, 2),
        })
    return rows, LEAD + ["tensors"]
