"""`bench rollout`: generation throughput of the HF rollout engine (`rollout/hf_engine.py`).

P prompts of random token ids, n samples each, exactly `max_new_tokens` new tokens per sample
(EOS disabled, so every row runs to the end), temperature 1 with the engine's own decode loop:
prefill once per prompt, the KV cache repeated n times, one forward per new token over all rows.
Reported: generated tokens / wall time of `engine.generate` (prefill included), after a short
warm-up generation.

The bound: decoding is memory-bandwidth bound -- every decode step reads all weights once for
the whole batch -- so at most rows x copy bandwidth / weight bytes tokens/s (`copy_bandwidth_gbs`
of `bench sync`; KV-cache reads and the prefill are not counted, so the bound is generous).

Sizes: CPU, a Qwen2-shaped 40M-parameter LLM (hidden 512, 8 layers, vocab 32000, tied) in fp32,
4 prompts x 8 samples x 32 new tokens from 64-token prompts (`--quick`; 8 x 8 x 128 from 128
otherwise). GPU: Qwen2.5-1.5B's shape in bf16, 16 prompts x 8 samples x 256 new tokens from
256-token prompts (`--quick`: 64 new tokens).
"""
from __future__ import annotations

import time

import torch

from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.bench.sync import copy_bandwidth_gbs, hf_qwen2_config
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.rollout.engine import Prompt, SamplingParams
from eureka_megatron.rollout.hf_engine import HFEngine

CPU_MODEL = LLMConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      tie_word_embeddings=True)
GPU_MODEL = LLMConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      tie_word_embeddings=True)  # Qwen2.5-1.5B's shape

# (prompts, samples per prompt, prompt tokens, new tokens)
SIZES = {("cpu", True): (4, 8, 64, 32), ("cpu", False): (8, 8, 128, 128),
         ("gpu", True): (16, 8, 256, 64), ("gpu", False): (16, 8, 256, 256)}


def build_engine(model: LLMConfig, dtype: torch.dtype, device: str, max_batch_size: int):
    """An HFEngine over a randomly initialised transformers Qwen2 (built on `device`), EOS off."""
    from transformers import CONFIG_MAPPING, Qwen2ForCausalLM

    config = CONFIG_MAPPING["qwen2"].from_dict(hf_qwen2_config(model))
    torch.manual_seed(0)
    with torch.device(device):
        hf = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    return HFEngine(hf.eval(), eos_token_ids=[], max_batch_size=max_batch_size)


def weight_bytes(engine) -> int:
    """Bytes of the engine's parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in engine.model.parameters())


def generate_timed(engine, prompts, n: int, max_new_tokens: int, seed: int = 0):
    """(seconds, samples) of one `engine.generate` call."""
    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    samples = engine.generate(prompts, n, sampling)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, samples


def run(quick: bool = False, sizes: tuple[int, int, int, int] | None = None,
        model: LLMConfig | None = None) -> tuple[list[dict], list[str]]:

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    model = model or (GPU_MODEL if gpu else CPU_MODEL)
    n_prompts, n, prompt_len, new = sizes or SIZES[("gpu" if gpu else "cpu", quick)]
    rows_per_batch = n_prompts * n
    engine = build_engine(model, dtype, device, max_batch_size=rows_per_batch)
    gen = torch.Generator().manual_seed(0)
    prompts = [Prompt(torch.randint(100, model.vocab_size, (prompt_len,), generator=gen).tolist())
               for _ in range(n_prompts)]
    generate_timed(engine, prompts[:1], n, 2)  # warm-up: allocator, kernels, threads
    seconds, samples = generate_timed(engine, prompts, n, new)
    tokens = sum(len(s.token_ids) for s in samples)
    wbytes = weight_bytes(engine)
    del engine
    if gpu:
        torch.cuda.empty_cache()  # the benches after this one start their own processes
    bandwidth = copy_bandwidth_gbs(256 << 20 if quick or not gpu else 1 << 30)
    bound = rows_per_batch * bandwidth * 1e9 / wbytes
    rate = tokens / seconds
    name = f"Qwen2-shaped {model.num_parameters() / 1e9:.3g}B {'bf16' if gpu else 'fp32'}"
    row = {**lead("HF engine generate (sampling, T=1)",
                  f"{name}, {n_prompts} prompts x {n} samples x {new} new tokens",
                  seconds, rate, "tokens/s", 100 * rate / bound,
                  f"{rows_per_batch} rows x copy {bandwidth:.3g} GB/s / {wbytes / 1e9:.3g} GB weights"
                  f" = {bound:,.0f} tokens/s"),
           "prompt tokens": prompt_len, "samples": len(samples), "generated tokens": tokens,
           "ms per new token (all rows)": round(1e3 * seconds / new, 2),
           "weights (GB)": round(wbytes / 1e9, 3)}
    return [row], LEAD + ["prompt tokens", "generated tokens", "ms per new token (all rows)"]
