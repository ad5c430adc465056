"""`bench kernels`: the fused log-prob + entropy kernel against the torch reference (and
Liger-Kernel when installed): time, TFLOP/s, % of the measured matmul peak, peak extra memory.

GPU: T=16384, H=5120 (Qwen2.5-32B / InternVL2.5-38B's LLM) in bf16 at V=152064 and at V/8
(one TP=8 shard). FLOPs counted are the useful ones: forward 2THV, forward+backward 6THV (the
backward's recompute of the logits is not credited). Extra memory is the peak allocated beyond
the inputs (and their gradients). CPU (`--quick` or no GPU): small shapes, torch backend only --
the Triton interpreter measures nothing about speed.
"""
from __future__ import annotations

import time

import torch

from eureka_megatron.bench.hardware import matmul_peak_tflops
from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.kernels.logprob import logprob_entropy

GPU_SHAPES = [(16384, 5120, 152064), (16384, 5120, 152064 // 8)]
CPU_SHAPES = [(512, 256, 8192)]


def _candidates(cuda: bool):
    out = {"torch reference": lambda h, w, y: logprob_entropy(h, w, y, backend="torch")}
    if cuda:
        out = {"eureka triton": lambda h, w, y: logprob_entropy(h, w, y, backend="triton"), **out}
        try:
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            def liger(h, w, y):
                loss = LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0,
                                                                  0.0, "none")
                return -(loss[0] if isinstance(loss, tuple) else loss), None
            out["liger (no entropy)"] = liger
        except ImportError:
            pass
    return out


def _time(fn, backward: bool, repeats: int, cuda: bool) -> tuple[float, float]:
    """(best seconds, peak extra GiB) of fn() [+ backward of the summed outputs]."""
    best = float("inf")
    peak = 0.0
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        lp, ent = fn()
        if backward:
            (lp.sum() + (ent.sum() if ent is not None else 0)).backward()
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**30)
        best = min(best, time.perf_counter() - t0)
    return best, peak


def run(quick: bool = False) -> tuple[list[dict], list[str]]:

    cuda = torch.cuda.is_available()
    shapes = GPU_SHAPES if cuda and not quick else CPU_SHAPES
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    peak_tflops = matmul_peak_tflops()
    repeats = 3 if cuda else 1
    bound = f"measured {'bf16' if cuda else 'fp32'} matmul peak {peak_tflops:.3g} TFLOP/s"
    rows = []
    for T, H, V in shapes:
        size = f"T x H x V = {T} x {H} x {V}"
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = (torch.randn(T, H, generator=gen, device=device) * 0.5).to(dtype)
        weight = (torch.randn(V, H, generator=gen, device=device) * 0.02).to(dtype)
        labels = torch.randint(0, V, (T,), generator=gen, device=device)
        for name, impl in _candidates(cuda).items():
            for backward in (False, True):
                pass_ = "fwd+bwd" if backward else "fwd"
                h = hidden.detach().requires_grad_(backward)
                w = weight.detach().requires_grad_(backward)
                try:
                    secs, extra = _time(lambda: impl(h, w, labels), backward, repeats, cuda)
                except Exception as e:  # noqa: BLE001 -- OOM, or an optional peer's API drift
                    if not (isinstance(e, torch.cuda.OutOfMemoryError) or name.startswith("liger")):
                        raise
                    why = ("OOM" if isinstance(e, torch.cuda.OutOfMemoryError)
                           else f"failed: {type(e).__name__}")
                    rows.append({**lead(f"{name} {pass_}: {why}", size, None, None, "TFLOP/s",
                                        None, bound),
                                 "T x H x V": f"{T} x {H} x {V}", "impl": name, "pass": pass_,
                                 "ms": why})
                    continue
                flops = (6 if backward else 2) * T * H * V
                tflops = flops / secs / 1e12
                rows.append({**lead(f"{name} {pass_}", size, secs, tflops, "TFLOP/s",
                                    100 * tflops / peak_tflops, bound),
                             "T x H x V": f"{T} x {H} x {V}", "impl": name,
                             "pass": pass_, "ms": round(secs * 1e3, 2),
                             "TFLOP/s": round(tflops, 1 if cuda else 3),
                             "% of matmul peak": round(100 * tflops / peak_tflops, 1),
                             "peak extra mem (GiB)": round(extra, 3) if cuda else "n/a"})
    return rows, LEAD + ["peak extra mem (GiB)"]
