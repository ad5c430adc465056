"""The hardware bound the benchmarks compare against: measured dense matmul throughput."""
from __future__ import annotations

import os
import platform
import time

import torch


def matmul_peak_tflops(dtype: torch.dtype | None = None, n: int | None = None, repeats: int = 5) -> float:
    """Best-of-`repeats` TFLOP/s of an n x n x n matmul on this process's device.

    GPU: bf16 at n=8192 (what tensor cores reach in practice, below the datasheet figure).
    CPU: fp32 at n=1024 with all of this process's threads.
    """
    cuda = torch.cuda.is_available()
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    n = n or (8192 if cuda else 1024)
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    inner = 20 if cuda else 2
    best = float("inf")
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best / 1e12


def describe_machine() -> str:

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only (torch {torch.__version__})"
