"""`eureka-megatron doctor`: the acceptance run of a machine -- does every part we depend on work
here, and how fast? One row per check, each ok / FAIL / skipped (with the reason), its measured
value and the bound it is judged by; a failing check is recorded in one line and the rest still
run. `eureka-megatron doctor --help` describes every check and its sizes (cli/doctor.py).

The checks reuse the benches and the real training / sync code rather than restating them:
the matmul peak of `bench.hardware`, the kernel speed table of `bench kernels`, the megatron train
step of `train-lm` (`lm_run.build_trainable` + `train_step`) on `bench lm-step`'s models, and the
weight sync + train/rollout mismatch sums of the RL loop (`sync_weights`, `mismatch_sums`).
Without a GPU (or with `small`) every size is cut so the whole run takes well under a minute on
2 cores, and the Triton kernels run through the interpreter (TRITON_INTERPRET=1, set here before
triton is first imported).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from eureka_megatron.algo.mismatch import mismatch_sums
from eureka_megatron.bench import kernels as kernel_bench
from eureka_megatron.bench.hardware import describe_machine, matmul_peak_tflops
from eureka_megatron.bench.lm_step import CPU_MODEL, GPU_MODEL, flops_per_token
from eureka_megatron.bench.report import markdown_table, write_json
from eureka_megatron.bench.sync import hf_qwen2_config
from eureka_megatron.config import Config, OptimConfig, ParallelConfig, TrainConfig
from eureka_megatron.data.token_patterns import pattern_batch, split_batch
from eureka_megatron.kernels.logprob import logprob_entropy, triton_usable
from eureka_megatron.kernels.policy_loss import policy_loss
from eureka_megatron.models.forward import forward_token_logprobs
from eureka_megatron.models.llm import have_transformer_engine
from eureka_megatron.models.qwen2.hf import qwen2_mapping
from eureka_megatron.rollout.engine import Prompt, SamplingParams
from eureka_megatron.rollout.hf_engine import HFEngine
from eureka_megatron.rollout.weight_sync import sync_weights
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.runtime.errors import RankError
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.lm_run import build_trainable
from eureka_megatron.trainer.train_step import lm_forward, train_step

COLUMNS = ["check", "status", "value", "bound", "note"]

# Kernel correctness: (T, H, V rows, real vocab) for logprob_entropy (real < rows: padded rows
# are excluded, and the last tile is ragged); (B, L) for policy_loss.
LOGPROB_SHAPE = {"gpu": (2048, 1024, 32768, 32000), "small": (48, 32, 200, 190)}
POLICY_SHAPE = {"gpu": (64, 2048), "small": (8, 48)}
# Relative error (max |triton - ref| / max |ref|) allowed against the float64 torch reference:
# values are fp32 either way (bf16 products are exact in the fp32 accumulator); gradients are
# returned in the input dtype, so bf16 rounding bounds them (the unit tests' tolerance).
VALUE_TOL = 1e-5
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}
# Train step: (model, sequence length, sequences per step, steps; the last is reported).
TRAIN = {"gpu": (GPU_MODEL, 2048, 8, 3), "small": (CPU_MODEL, 128, 4, 2)}
# Engine sync: (prompt tokens, samples, new tokens) scored by the engine and the trainer.
SYNC = {"gpu": (32, 8, 128), "small": (16, 4, 16)}
# Train/rollout log-prob agreement after the sync: fp32 both sides is the numerical contract
# (DESIGN.md, within 1e-4 in the RL loop test); bf16 trainer (TE) vs bf16 HF engine differ by
# kernels and rounding, so only the mean is held to a loose bound.
SYNC_MAX_FP32 = 1e-4
SYNC_MEAN_BF16 = 0.05
ALL_REDUCE_BYTES = {"gpu": 1 << 30, "small": 64 << 20}


@dataclass
class Context:
    gpu: bool
    small: bool
    interpreted: bool  # Triton runs through its interpreter (no GPU)
    peak: float | None = None  # measured matmul TFLOP/s, once the matmul peak check ran
    train: dict | None = None  # the train-step rank's result, for the engine-sync row
    train_error: str | None = None

    @property
    def size(self) -> str:
        return "small" if self.small else "gpu"


def row(group: str, check: str, status: str, value: str = "", bound: str = "", note: str = "",
        **detail) -> dict:
    """A table row; `detail` keeps the numbers for the JSON. No "|" in a cell (an error message
    may hold one): it would split the markdown row."""
    cells = {"check": check, "status": status, "value": value, "bound": bound, "note": note}
    return {"group": group, **{k: v.replace("|", "/") for k, v in cells.items()}, **detail}


def one_line(e: BaseException) -> str:
    """The exception in one line; for a failed rank, the last line of its traceback (the rank's
    own exception), not "rank 0 failed:"."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if isinstance(e, RankError) and lines:
        return lines[-1]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _sci(x: float) -> str:
    return f"{x:.2g}"


# --- versions ------------------------------------------------------------------------------------


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _import_version(name: str, module: str, ctx: Context, missing: str) -> dict:
    """ok with the version when `module` imports; skipped when it is not installed; FAIL when it
    is installed but does not import on a GPU machine (TE without cuDNN, a DALI/CUDA mismatch)."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):  # a dependency of it is missing
            return row("versions", name, "FAIL" if ctx.gpu else "skipped",
                       note=f"installed, import failed: {one_line(e)}")
        return row("versions", name, "skipped", note=f"not installed ({missing})")
    except Exception as e:  # noqa: BLE001 -- a broken install raises anything
        return row("versions", name, "FAIL" if ctx.gpu else "skipped",
                   note=f"installed, import failed: {one_line(e)}")
    return row("versions", name, "ok", getattr(mod, "__version__", "?"))


def check_versions(ctx: Context) -> list[dict]:
    rows = [row("versions", "torch", "ok", torch.__version__,
                note=f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU build")]
    if ctx.gpu:
        props = torch.cuda.get_device_properties(0)
        rows.append(row("versions", "CUDA", "ok", f"{torch.version.cuda}",
                        note=f"{torch.cuda.device_count()} x {props.name}, "
                             f"{props.total_memory / 2**30:.0f} GiB, "
                             f"sm_{props.major}{props.minor}"))
        nccl = torch.cuda.nccl.version()
        rows.append(row("versions", "NCCL", "ok",
                        ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)))
    else:
        rows += [row("versions", "CUDA", "skipped", note="no CUDA device"),
                 row("versions", "NCCL", "skipped", note="no CUDA device (gloo between ranks)")]
    triton = _dist_version("triton", "pytorch-triton")
    rows.append(row("versions", "triton", "ok" if triton else "FAIL", triton or "",
                    note=("interpreter (TRITON_INTERPRET=1)" if ctx.interpreted else "compiled")
                    if triton else "not installed: the fused kernels cannot run"))
    rows.append(row("versions", "megatron-core", "ok", _dist_version("megatron-core") or "?"))
    rows.append(row("versions", "transformers", "ok", _dist_version("transformers") or "?"))
    rows.append(_import_version("transformer-engine", "transformer_engine", ctx,
                                "megatron's local layer spec is used"))
    sglang = _dist_version("sglang")  # not imported: seconds of imports, CUDA initialisation
    rows.append(row("versions", "sglang", "ok", sglang) if sglang else
                row("versions", "sglang", "skipped", note="not installed (the HF engine is used)"))
    rows.append(_import_version("DALI", "nvidia.dali", ctx, "PIL decodes the images"))
    liger = _dist_version("liger-kernel", "liger_kernel")
    rows.append(row("versions", "liger-kernel", "ok", liger) if liger else
                row("versions", "liger-kernel", "skipped",
                    note="not installed (kernel speed has no Liger rows)"))
    return rows


# --- matmul peak ---------------------------------------------------------------------------------


def check_matmul_peak(ctx: Context) -> list[dict]:
    ctx.peak = matmul_peak_tflops()
    what = "bf16 8192^3 on one GPU" if ctx.gpu else "fp32 1024^3, all this process's threads"
    return [row("matmul peak", "matmul peak", "ok", f"{ctx.peak:.3g} TFLOP/s",
                note=f"{what}; the bound of the kernel speed and train-step rows", tflops=ctx.peak)]


# --- kernels: correctness ------------------------------------------------------------------------


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    e = expected.detach().double()
    return float((actual.detach().double() - e).abs().max() / e.abs().max().clamp(min=1e-30))


def _leaf(t: torch.Tensor, dtype: torch.dtype, compute: torch.dtype) -> torch.Tensor:
    """`t` rounded to `dtype`, as a fresh `compute`-dtype leaf: both backends see equal inputs."""
    return t.detach().to(dtype).to(compute).clone().requires_grad_()


def _logprob_errors(dtype: torch.dtype, device: str, shape) -> dict[str, float]:
    """Triton (dtype) vs the torch backend in float64 on the same rounded inputs: values and both
    gradients under random upstream gradients, temperature 0.9, ignored labels, padded vocab."""
    T, H, V, real = shape
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, generator=gen, device=device).to(dtype)
    weight = (torch.randn(V, H, generator=gen, device=device) * H ** -0.5).to(dtype)
    labels = torch.randint(0, real, (T,), generator=gen, device=device)
    labels[::7] = -100
    g_lp, g_ent = torch.randn(2, T, generator=gen, device=device, dtype=torch.float64)
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        h, w = _leaf(hidden, dtype, dt), _leaf(weight, dtype, dt)
        lp, ent = logprob_entropy(h, w, labels, temperature=0.9, vocab_size=real, backend=backend)
        ((lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()).backward()
        out[backend] = (lp, ent, h.grad, w.grad)
    names = ["logprobs", "entropy", "d_hidden", "d_weight"]
    return {n: _rel(a, e) for n, a, e in zip(names, out["triton"], out["torch"])}


def _policy_errors(dtype: torch.dtype, device: str, shape) -> dict[str, float]:
    """Triton (dtype) vs the torch backend in float64: PPO clip + dual clip + k3 KL + entropy."""
    B, L = shape
    gen = torch.Generator(device=device).manual_seed(1)

    def noise():
        return torch.randn(B, L, generator=gen, device=device)

    lp = noise() * 0.5 - 2
    old, ref = lp + noise() * 0.1, lp + noise() * 0.1
    ent = torch.rand(B, L, generator=gen, device=device)
    adv = torch.randn(B, generator=gen, device=device)
    mask = torch.rand(B, L, generator=gen, device=device) > 0.2
    out = {}
    for backend, dt in (("triton", dtype), ("torch", torch.float64)):
        lp_, ent_ = _leaf(lp, dtype, dt), _leaf(ent, dtype, dt)
        loss, _ = policy_loss(lp_, old.to(dtype).to(dt), adv.double() if dt == torch.float64
                              else adv, mask, ref_logprobs=ref.to(dtype).to(dt),
                              entropy=ent_, kl_coef=0.1,
                              entropy_coef=0.01, dual_clip=3.0, backend=backend)
        loss.backward()
        out[backend] = (loss, lp_.grad, ent_.grad)
    names = ["loss", "d_logprobs", "d_entropy"]
    return {n: _rel(a, e) for n, a, e in zip(names, out["triton"], out["torch"])}


def check_kernels(ctx: Context) -> list[dict]:
    device = "cuda" if ctx.gpu else "cpu"
    if not triton_usable(device):
        why = ("triton is not installed" if _dist_version("triton", "pytorch-triton") is None
               else "triton was imported before TRITON_INTERPRET=1 could be set")
        return [row("kernels", "kernels", "skipped" if not ctx.gpu else "FAIL", note=why)]
    how = "interpreted (TRITON_INTERPRET=1)" if ctx.interpreted else "compiled"
    T, H, V, real = LOGPROB_SHAPE["small" if ctx.interpreted else ctx.size]
    B, L = POLICY_SHAPE["small" if ctx.interpreted else ctx.size]
    cases = [("logprob_entropy", _logprob_errors, (T, H, V, real),
              f"T x H x V = {T} x {H} x {V} ({real} real), fwd + bwd"),
             ("policy_loss", _policy_errors, (B, L), f"B x L = {B} x {L}, fwd + bwd")]
    rows = []
    for name, errors_fn, shape, size in cases:
        for dtype, dname in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            t0 = time.perf_counter()
            errors = errors_fn(dtype, device, shape)
            tol = {k: (GRAD_TOL[dtype] if k.startswith("d_") else VALUE_TOL) for k in errors}
            bad = [k for k in errors if not errors[k] <= tol[k]]  # NaN fails too
            worst = max(errors, key=lambda k: errors[k] / tol[k])
            rows.append(row(
                "kernels", f"{name} {dname}", "FAIL" if bad else "ok",
                f"max rel err {_sci(errors[worst])} ({worst})",
                f"values < {_sci(VALUE_TOL)}, grads < {_sci(GRAD_TOL[dtype])} vs fp64 torch",
                f"{how}, {size}; " + ", ".join(f"{k} {_sci(v)}" for k, v in errors.items())
                + (f"; over the bound: {', '.join(bad)}" if bad else ""),
                errors=errors, seconds=time.perf_counter() - t0))
    return rows


# --- kernels: speed ------------------------------------------------------------------------------


def check_kernel_speed(ctx: Context) -> list[dict]:
    if not ctx.gpu:
        return [row("kernel speed", "kernel speed", "skipped",
                    note="no GPU: the Triton interpreter measures nothing about speed")]
    rows = []
    for r in kernel_bench.run(quick=ctx.small)[0]:
        measured = isinstance(r["ms"], (int, float))
        rows.append(row(
            "kernel speed", f"{r['impl']} {r['pass']}", "ok" if measured else "skipped",
            f"{r['ms']} ms, {r['TFLOP/s']} TFLOP/s = {r['% of matmul peak']}% of peak"
            if measured else "", r["bound"],
            f"T x H x V = {r['T x H x V']}" + (f", peak extra {r['peak extra mem (GiB)']} GiB"
                                              if measured else f": {r['ms']}"),
            bench_row=r))
    return rows


# --- train step + engine sync (one spawned rank) -------------------------------------------------


def _train_config(ctx: Context) -> Config:
    model, seq, batch, steps = TRAIN[ctx.size]
    return Config(model=model,
                  parallel=ParallelConfig(tensor_parallel=1, nproc=1, bf16=ctx.gpu),
                  optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=1),
                  train=TrainConfig(steps=steps, seq_length=seq, micro_batch_size=1,
                                    global_batch_size=batch)).validate()


def _sequences(prompt: list[int], samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + each sample, right-padded: ids, labels (the generated tokens, -100 elsewhere) and
    the engine's log-probs at the label positions."""
    rows = [prompt + s.token_ids for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    engine_lp = torch.zeros(len(rows), width, dtype=torch.float64)
    p = len(prompt)
    for i, (r, s) in enumerate(zip(rows, samples)):
        ids[i, :len(r)] = torch.tensor(r)
        labels[i, p - 1:len(r) - 1] = torch.tensor(s.token_ids)
        engine_lp[i, p - 1:len(r) - 1] = torch.tensor(s.logprobs, dtype=torch.float64)
    return ids, labels, engine_lp


def _sync_and_compare(model, cfg: Config, sizes) -> dict:
    """Sync the trained weights into a fresh HF engine (empty weights), let it sample, and score
    the same tokens with the trainer's fused-kernel log-probs."""
    prompt_len, n, new_tokens = sizes
    gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if cfg.parallel.bf16 else torch.float32
    engine = HFEngine.from_config(hf_qwen2_config(cfg.model), dtype=dtype,
                                  device="cuda" if gpu else "cpu")
    model.gather_params()
    res = sync_weights(model.unwrapped, qwen2_mapping(cfg.model, "model.", "lm_head.weight"),
                       engine, version=1)
    if not res.ok:
        raise RuntimeError(f"weight sync failed: {res.error}")
    prompt = pattern_batch(cfg.train.seed, 0, 1, prompt_len, cfg.model.vocab_size)["input_ids"]
    prompt = prompt[0].tolist()
    samples = engine.generate([Prompt(input_ids=prompt)], n,
                              SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0))
    ids, labels, engine_lp = _sequences(prompt, samples)
    dev = "cuda" if gpu else "cpu"
    # The trainer's log-probs: the compiled fused kernel on GPU; on CPU its torch backend, as CPU
    # runs use it (interpreted at V=8192 it would take a minute; the kernels rows check Triton).
    for c in model.chunks:
        c.eval()
    (trainer_lp,) = forward_token_logprobs(
        model.chunks, [{"input_ids": ids.to(dev), "labels": labels.to(dev)}],
        lambda chunk, mb: chunk(mb["input_ids"], None, attention_mask=None),
        vocab_size=cfg.model.vocab_size, backend=None if gpu else "torch")
    mask = labels >= 0
    sums = mismatch_sums(trainer_lp.cpu(), engine_lp, mask, cap=2.0)
    tokens = int(mask.sum())
    return {"max": float(sums["rollout_logprob_abs_diff_max"]),
            "mean": float(sums["rollout_logprob_abs_diff_tsum"]) / max(tokens, 1),
            "tokens": tokens, "samples": n, "new_tokens": new_tokens,
            "version": engine.weight_version, "dtype": "bf16" if cfg.parallel.bf16 else "fp32",
            "sync_s": res.seconds, "sync_gb": res.bytes / 1e9, "tensors": res.tensors}


def _train_and_sync_rank(cfg: Config, sync_sizes) -> dict:
    """Rank function: `cfg.train.steps` train steps (the last timed), then the engine sync."""
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = build_trainable(cfg)
    forward = lm_forward(cfg.model.vocab_size)
    history = []
    for step in range(1, cfg.train.steps + 1):
        batch = pattern_batch(cfg.train.seed, step, cfg.train.global_batch_size,
                              cfg.train.seq_length, cfg.model.vocab_size)
        t0 = time.perf_counter()
        metrics = train_step(model, split_batch(batch, 0, 1, cfg.train.micro_batch_size), forward)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        history.append({**metrics, "seconds": time.perf_counter() - t0})
    out = {"history": history, "te": have_transformer_engine(),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
           else None}
    try:
        out["sync"] = _sync_and_compare(model, cfg, sync_sizes)
    except Exception as e:  # noqa: BLE001 -- the sync row reports it; the train row stands
        out["sync_error"] = one_line(e)
    return out


def check_train_step(ctx: Context) -> list[dict]:
    cfg = _train_config(ctx)
    if ctx.gpu:
        torch.cuda.empty_cache()  # what the kernel checks cached goes back: the rank needs it
    try:
        ctx.train = launch(_train_and_sync_rank, 1, cfg, SYNC[ctx.size], timeout=600)[0]
    except Exception as e:
        ctx.train_error = one_line(e)
        raise
    last, first = ctx.train["history"][-1], ctx.train["history"][0]
    m = cfg.model
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    tokens_s = tokens / last["seconds"]
    tflops = tokens_s * flops_per_token(m, cfg.train.seq_length) / 1e12
    peak = ctx.peak if ctx.peak is not None else matmul_peak_tflops()
    finite = all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"])
                 for h in ctx.train["history"])
    dtype = "bf16" if cfg.parallel.bf16 else "fp32"
    spec = "TE spec" if ctx.train["te"] else "local spec" + (
        "" if not ctx.gpu else " (transformer-engine does not import)")
    mem = f", peak {ctx.train['peak_gib']:.1f} GiB" if ctx.train["peak_gib"] is not None else ""
    return [row("train step", f"megatron train step {dtype}", "ok" if finite else "FAIL",
                f"{tokens_s:,.0f} tokens/s, MFU {100 * tflops / peak:.1f}%",
                f"measured matmul peak {peak:.3g} TFLOP/s",
                f"Qwen2-shaped {m.num_parameters() / 1e6:,.1f}M params, {spec}, {dtype}, "
                f"{tokens} tokens/step, step {cfg.train.steps}: {last['seconds']:.2f} s{mem}; "
                f"loss {first['loss']:.3f} -> {last['loss']:.3f}"
                + ("" if finite else "; loss or grad-norm not finite"),
                tokens_per_s=tokens_s, mfu=tflops / peak, history=ctx.train["history"])]


def check_engine_sync(ctx: Context) -> list[dict]:
    if ctx.train is None:
        return [row("engine sync", "engine sync", "skipped",
                    note=f"the train step failed: {ctx.train_error or 'not run'}")]
    if "sync_error" in ctx.train:
        return [row("engine sync", "engine sync", "FAIL", note=ctx.train["sync_error"])]
    s = ctx.train["sync"]
    if s["dtype"] == "fp32":
        ok, bound = s["max"] <= SYNC_MAX_FP32, f"max < {_sci(SYNC_MAX_FP32)} (fp32 contract)"
    else:
        ok, bound = s["mean"] <= SYNC_MEAN_BF16, f"mean < {SYNC_MEAN_BF16} (bf16 vs bf16)"
    ok = ok and s["version"] == 1
    return [row("engine sync", f"megatron -> hf engine, {s['dtype']}", "ok" if ok else "FAIL",
                f"log-prob diff, train vs rollout: max {_sci(s['max'])}, mean {_sci(s['mean'])}",
                bound,
                f"{s['samples']} samples x {s['new_tokens']} tokens ({s['tokens']} scored); sync "
                f"{s['sync_gb']:.3g} GB, {s['tensors']} tensors in {s['sync_s']:.2f} s; "
                f"engine weight version {s['version']}", **s)]


# --- all-reduce ----------------------------------------------------------------------------------


def _all_reduce_rank(nbytes: int, world: int) -> float:
    """Best-of-5 seconds of one fp32 all-reduce of `nbytes` over NCCL."""
    init_distributed(ParallelConfig(nproc=world))
    x = torch.ones(nbytes // 4, device="cuda")
    best = float("inf")
    for i in range(7):
        torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        torch.distributed.all_reduce(x)
        torch.cuda.synchronize()
        if i >= 2:  # two warm-ups: NCCL builds its rings / channels on first use
            best = min(best, time.perf_counter() - t0)
    return best


def check_all_reduce(ctx: Context) -> list[dict]:
    n = torch.cuda.device_count() if ctx.gpu else 0
    if n < 2:
        return [row("all-reduce", "all-reduce", "skipped",
                    note=f"{n} GPU{'s' if n != 1 else ''}: needs 2 or more")]
    nbytes = ALL_REDUCE_BYTES[ctx.size]
    seconds = max(launch(_all_reduce_rank, n, nbytes, n, timeout=300))
    algbw = nbytes / seconds / 1e9
    busbw = algbw * 2 * (n - 1) / n  # nccl-tests' bus bandwidth: comparable across GPU counts
    return [row("all-reduce", f"NCCL all-reduce, {n} GPUs", "ok",
                f"{busbw:,.0f} GB/s bus bandwidth",
                note=f"{nbytes >> 20} MiB fp32, {seconds * 1e3:.2f} ms; algorithm bandwidth "
                     f"{algbw:,.0f} GB/s (nccl-tests convention)", busbw_gbs=busbw,
                seconds=seconds)]


CHECKS: list[tuple[str, Callable[[Context], list[dict]]]] = [
    ("versions", check_versions), ("matmul peak", check_matmul_peak), ("kernels", check_kernels),
    ("kernel speed", check_kernel_speed), ("train step", check_train_step),
    ("engine sync", check_engine_sync), ("all-reduce", check_all_reduce)]
GROUPS = [group for group, _ in CHECKS]


def use_interpreter_without_gpu() -> bool:
    """Without CUDA, Triton can only run interpreted, which must be chosen before it is imported
    (here, and by the spawned rank, which inherits the environment)."""
    if torch.cuda.is_available():
        return False
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return triton_usable("cpu")


def run_doctor(small: bool = False, out: Path | None = None) -> int:
    """Every check, the table on stdout, the rows as JSON in `out`; 1 if any check FAILed."""
    gpu = torch.cuda.is_available()
    ctx = Context(gpu=gpu, small=small or not gpu, interpreted=use_interpreter_without_gpu())
    machine = describe_machine()
    print(f"[doctor] {machine}; {'small' if ctx.small else 'full'} sizes", file=sys.stderr,
          flush=True)
    rows: list[dict] = []
    t_all = time.perf_counter()
    for i, (group, check) in enumerate(CHECKS, 1):
        t0 = time.perf_counter()
        try:
            rows += check(ctx)
        except Exception as e:  # noqa: BLE001 -- one failing check must not stop the others
            rows.append(row(group, group, "FAIL", note=one_line(e)))
        print(f"[doctor {i}/{len(CHECKS)}] {group}: {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
    failed = [r["check"] for r in rows if r["status"] == "FAIL"]
    print(f"\n### doctor on {machine}\n")
    print(markdown_table(rows, COLUMNS))
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "FAIL", "skipped")}
    print(f"\n{len(rows)} checks: {count['ok']} ok, {count['FAIL']} FAIL, {count['skipped']} "
          f"skipped ({time.perf_counter() - t_all:.0f} s)"
          + (f"; FAIL: {', '.join(failed)}" if failed else ""), flush=True)
    write_json(out, "doctor", machine, rows)
    return 1 if failed else 0
