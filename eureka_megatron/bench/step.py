"""`bench step`: one RL step of the real loop (`trainer.loop.run_rl`): rollout -> rewards ->
log-probs -> train -> weight sync, with its tokens/s, MFU and time split.

The loop runs on spawned ranks exactly as `eureka-megatron train` runs it -- Megatron actor, HF
engine, reward pool, synthetic `count_circles` data -- with no stage-0 warm-up, no eval, no
checkpoints and no HF export (the run is cut one step before its last, which would save). It
runs 2 steps (`--quick`) or 3 and reports the last: the first warms up allocators and caches.
The online filter is off (every step trains on exactly prompts x samples sequences, whatever the
rewards of a random model) and the batch is trained as 2 mini-batches, so the old log-probs
are recomputed in their own forward pass (the `log-prob` row); no KL, so no reference model.

Sizes:
- CPU: the demo's tiny Qwen2.5-VL (`trainer/demo.py`: 2 layers, hidden 128; vision depth 2,
  trained), fp32, 16 prompts x 8 samples x 12 new tokens, 56 x 56 images (`--quick`: 8 prompts).
- GPU: a Qwen2.5-VL-shaped ~2.2B model with random weights written as an HF checkpoint in a
  temp dir: the LLM of Qwen2.5-1.5B (hidden 1536, 28 layers, 12 heads / 2 KV heads,
  intermediate 8960, vocab 151936, tied) and Qwen2.5-VL's vision tower (depth 32, hidden 1280,
  intermediate 3420, 16 heads, out_hidden 1536, frozen), bf16 actor and HF engine on one GPU,
  16 prompts x 8 samples x 256 new tokens (EOS is never sampled by random weights, so all 256
  are generated), 224 x 224 images (64 image tokens). `--quick`: 64 new tokens.

Reported rows: the whole step (tokens/s = trained tokens, prompt + response, / step time; MFU =
6 N tokens/s over the measured matmul peak, N = the LLM's parameters without the input
embedding, via `trainer.metrics.mfu`); then its parts -- generate (`engine.generate`; bound: the
decode bandwidth bound of `bench rollout`), reward (`pool.score`), log-prob (old log-probs,
micro-batch planning and advantages; 2N FLOPs/token), train (6N), sync (weight bytes over the
memory-copy bandwidth) and other (the rest: batching, broadcasts, metrics) -- each with its share
of the step; the run's padding efficiency (real / computed tokens of its micro-batches). Then
padded and packed micro-batches of an MM-Eureka-sized step (`bench/padding.py`).
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from eureka_megatron.bench.hardware import matmul_peak_tflops
from eureka_megatron.bench.padding import padding_rows
from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.bench.sync import copy_bandwidth_gbs
from eureka_megatron.data.tiny_tokenizer import tiny_tokenizer, tiny_vocab
from eureka_megatron.models.registry import family_for
from eureka_megatron.rollout.hf_engine import HFEngine
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint
from eureka_megatron.trainer.metrics import mfu

# (prompts, samples per prompt, new tokens) and steps run (the last is reported)
SIZES = {("cpu", True): (8, 8, 12), ("cpu", False): (16, 8, 12),
         ("gpu", True): (16, 8, 64), ("gpu", False): (16, 8, 256)}
STEPS = {True: 2, False: 3}


def gpu_model_config():
    """Qwen2.5-VL with Qwen2.5-1.5B's LLM and Qwen2.5-VL's vision tower; special-token ids of
    the in-repo tokenizer (the synthetic prompts only use its words)."""
    from transformers import Qwen2_5_VLConfig

    v = tiny_vocab()
    eos, pad = v["<|im_end|>"], v["<|endoftext|>"]
    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                max_position_embeddings=32768, tie_word_embeddings=True,
                initializer_range=0.02, eos_token_id=eos, bos_token_id=None, pad_token_id=pad,
                rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": [16, 24, 24]})
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                  out_hidden_size=1536, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.02)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
                            vision_start_token_id=v["<|vision_start|>"],
                            vision_end_token_id=v["<|vision_end|>"], eos_token_id=eos,
                            pad_token_id=pad, tie_word_embeddings=True)


def write_gpu_checkpoint(out: Path) -> Path:
    """The GPU model with random bf16 weights (initialised on the GPU) + the in-repo tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(gpu_model_config(),
                                                                 dtype=torch.bfloat16)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def bench_config(work: Path, hf: Path, gpu: bool, quick: bool, steps: int):
    """The RL config of the bench: the demo's, with the overrides the module docstring lists."""
    prompts, n, new = SIZES[("gpu" if gpu else "cpu", quick)]
    over = [f"model.hf={hf}", "warmup.steps=0", f"train.steps={steps + 1}",
            f"train.rollout_batch_size={prompts}", f"rollout.n_samples={n}",
            f"rollout.max_new_tokens={new}", "rollout.max_filter_rounds=1",
            "algo.online_filter=false", "algo.kl_coef=0.0", "train.mini_batches=2",
            "eval.interval=0", "eval.size=1", "checkpoint.save_interval=0",
            "output.progress=false", "output.tensorboard=false", "output.hf_export=false",
            "output.hf_export_interval=0", "data.synthetic_size=256"]
    if gpu:
        over += ["parallel.bf16=true", "model.rollout_dtype=bf16", "model.freeze_vision=true",
                 "optim.lr=1e-6", "optim.min_lr=1e-6",
                 "data.image_size=224", "rewards.num_workers=2"]
    return demo_config(work / "run", over)


def _rank(cfg, steps: int) -> dict:
    from eureka_megatron.trainer.loop import run_rl

    history = run_rl(cfg, stop_after=steps)
    return history[-1]


def model_numbers(hf: Path) -> dict:
    """Parameter counts of the checkpoint: the LLM's a token multiplies (for MFU: a MoE's active
    experts, without the input embedding, a lookup), the LLM's (read every decode step), and every
    tensor's (what a sync sends)."""
    hf_config = json.loads((hf / "config.json").read_text())
    mcfg = family_for(hf_config, str(hf / "config.json")).config_from_hf(hf_config, hf)
    text = getattr(mcfg, "text", mcfg)
    llm = text.num_parameters()
    total = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                total += torch.Size(st.get_slice(name).get_shape()).numel()
    embedding = 0 if text.tie_word_embeddings else text.vocab_size * text.hidden_size
    return {"mfu_params": text.num_active_parameters() - embedding, "llm_params": llm,
            "all_params": total}


def run(quick: bool = False) -> tuple[list[dict], list[str]]:
    gpu = torch.cuda.is_available()
    steps = STEPS[quick]
    work = Path(tempfile.mkdtemp(prefix="bench-step-"))
    try:
        hf = write_gpu_checkpoint(work / "hf") if gpu else write_tiny_checkpoint(work / "hf", seed=0)
        cfg = bench_config(work, hf, gpu, quick, steps)
        numbers = model_numbers(hf)
        peak = matmul_peak_tflops() * 1e12  # measured before the ranks start: nothing competes
        bandwidth = copy_bandwidth_gbs(256 << 20 if quick or not gpu else 1 << 30)
        if gpu:
            torch.cuda.empty_cache()  # the rank gets the GPU to itself
        m = launch(_rank, cfg.parallel.nproc, cfg, steps, timeout=1800)[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert m["step"] == steps, f"bench step: the run stopped at step {m['step']}, not {steps}"
    rows, columns = step_rows(m, cfg, numbers, peak, bandwidth, gpu)
    padding = padding_rows()
    return rows + padding, columns + [c for c in padding[0] if c not in columns and c not in
                                      ("throughput/value", "throughput/unit")]


def step_rows(m: dict, cfg, numbers: dict, peak_flops: float, bandwidth_gbs: float,
              gpu: bool) -> tuple[list[dict], list[str]]:
    """The table of one step's metrics `m` (a `run_rl` history record)."""

    prompts, n, new = cfg.train.rollout_batch_size, cfg.rollout.n_samples, cfg.rollout.max_new_tokens
    step_s, tokens = m["time/step_s"], m["train/tokens"]
    rounds = m["filter/rounds"]
    responses = prompts * n * rounds
    generated = round(m["response_length/mean"] * responses)
    train_bytes = 2 if cfg.parallel.bf16 else 4
    engine_bytes = 2 if cfg.model.rollout_dtype == "bf16" else 4
    sync_bytes = numbers["all_params"] * train_bytes
    n_mfu = numbers["mfu_params"]
    max_rows = HFEngine.__init__.__kwdefaults__["max_batch_size"]
    rows_per_batch = min(prompts, max(1, max_rows // n)) * n
    decode_bound = rows_per_batch * bandwidth_gbs * 1e9 / (numbers["llm_params"] * engine_bytes)
    dtype = "bf16" if gpu else "fp32"
    peak_txt = f"measured {dtype} matmul peak {peak_flops / 1e12:.3g} TFLOP/s"
    size = (f"{numbers['all_params'] / 1e6:.3g}M params ({dtype}), {prompts} prompts x {n} "
            f"samples x {new} new tokens, {tokens:.0f} trained tokens")
    tokens_s = tokens / step_s
    parts = {"generate": m["time/generate_s"], "reward": m["time/reward_s"],
             "log-prob": m["time/logprobs_s"], "train": m["time/train_s"],
             "sync": m["time/sync_s"]}
    parts["other"] = step_s - sum(parts.values())
    rows = [{**lead("RL step (all of it)", size, step_s, tokens_s, "tokens/s",
                    100 * mfu(tokens_s, n_mfu, peak_flops), f"MFU (6N FLOP/token), {peak_txt}"),
             "% of step": 100.0}]
    detail = {
        "generate": ("rollout: engine.generate", f"{responses:.0f} responses, {generated} tokens",
                     generated, "tokens/s", lambda r: 100 * r / decode_bound,
                     f"decode: {rows_per_batch} rows x copy {bandwidth_gbs:.3g} GB/s / LLM weights"
                     f" = {decode_bound:,.0f} tokens/s"),
        "reward": ("rewards: pool.score", f"{responses:.0f} responses, "
                   f"{cfg.rewards.num_workers} worker(s)", responses, "responses/s", None, "n/a"),
        "log-prob": ("old log-probs (+ planning, advantages)", f"{tokens:.0f} tokens", tokens,
                     "tokens/s", lambda r: 100 * 2 * n_mfu * r / peak_flops,
                     f"2N FLOP/token, {peak_txt}"),
        "train": ("train (fwd + bwd + optimizer)", f"{tokens:.0f} tokens, "
                  f"{cfg.train.mini_batches} mini-batches", tokens, "tokens/s",
                  lambda r: 100 * mfu(r, n_mfu, peak_flops), f"MFU (6N FLOP/token), {peak_txt}"),
        "sync": ("weight sync -> engine", f"{sync_bytes / 1e9:.3g} GB", sync_bytes / 1e9, "GB/s",
                 lambda r: 100 * r / bandwidth_gbs, f"memory copy {bandwidth_gbs:.3g} GB/s"),
        "other": ("other (batching, broadcasts, metrics)", "", None, "", None, "n/a"),
    }
    for key, seconds in parts.items():
        what, sz, amount, unit, pct, bound = detail[key]
        rate = amount / seconds if amount is not None and seconds > 0 else None
        rows.append({**lead(what, sz, seconds, rate, unit,
                            pct(rate) if pct is not None and rate is not None else None, bound),
                     "% of step": 100 * seconds / step_s})
    rows[0].update({"mfu_params": n_mfu, "peak_tflops": peak_flops / 1e12,
                    "trained tokens": tokens, "generated tokens": generated,
                    "loop tokens_per_s": m["tokens_per_s"], "step": m["step"],
                    "padding efficiency": m["train/padding_efficiency"]})
    return rows, LEAD + ["% of step"]
