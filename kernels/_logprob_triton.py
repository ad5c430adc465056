"""Triton kernels behind `eureka_megatron.kernels.logprob` (backend="triton").

Import this module only where Triton can run (a CUDA device, or TRITON_INTERPRET=1 set before
the first import, which turns every `@triton.jit` below into a CPU-interpreted function).

Forward: `_fwd_stats_kernel` over a grid (token blocks, vocab splits). Each program walks the
vocabulary tiles of its split, builds a [BLOCK_M, BLOCK_N] logits tile with `tl.dot` (fp32
accumulation), masks columns past the real vocabulary to -inf, and keeps an online
(max m, sum-exp s, shifted entropy sum t = sum exp(x - m) * (x - m), target logit) per row.
The partials land in four [T, splits] fp32 buffers; the caller merges them (tiny, in torch).

Backward, per vocabulary split of at most `bwd_split_cols` columns (the only large transient is
that [T, split] dlogits block, never [T, V]):
  1. `_dlogits_kernel` recomputes the logits tile and writes
     dlogits = (g_lp * (onehot - p) - g_H * p * (log p + H)) / temperature;
  2. `_gemm_kernel` accumulates d_hidden[T, H] (fp32 buffer, across splits) += dlogits @ W_split;
  3. `_gemm_kernel` writes d_weight_split = dlogits^T @ hidden, summed over all tokens in fp32
     inside the kernel and rounded once to the weight dtype.
Deterministic (no atomics); 8*T*H*V flops for forward + backward with recompute.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton import knobs

NEG_INF = tl.constexpr(float("-inf"))  # jit code may only read constexpr globals


# Fixed at import, like the @triton.jit decorations below (interpreted or compiled).
_INTERPRETED = bool(knobs.runtime.interpret)


def interpreting() -> bool:
    return _INTERPRETED


@dataclasses.dataclass
class Config:
    """Tile sizes and split policy. `fwd_split_cols` / `bwd_split_cols` of 0 mean adaptive."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    gemm_block_m: int = 128
    gemm_block_n: int = 128
    gemm_block_k: int = 32
    gemm_num_warps: int = 8
    gemm_num_stages: int = 3
    fwd_split_cols: int = 0
    bwd_split_cols: int = 0
    # Upper bound on the [T, split] dlogits block of the backward, in bytes.
    bwd_buffer_bytes: int = 256 << 20


# Small tiles in the interpreter: every program instance costs ~0.5 ms there, and small tiles with
# small splits exercise the ragged-tile masks and the multi-split merge on tiny test shapes.
INTERPRETER_CONFIG = Config(block_m=16, block_n=32, block_k=16, gemm_block_m=16, gemm_block_n=32,
                            gemm_block_k=16, fwd_split_cols=128, bwd_split_cols=96)
GPU_CONFIG = Config()
# Tests may set this to force a configuration.
CONFIG_OVERRIDE: Config | None = None


def _config(dtype: torch.dtype) -> Config:
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    if interpreting():
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        # fp32 tiles double the shared memory per stage.
        return dataclasses.replace(GPU_CONFIG, num_stages=2, gemm_num_stages=2)
    return GPU_CONFIG


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(cast tiles to fp32 before tl.dot, input_precision).

    The interpreter multiplies bf16 bit patterns in tl.dot, so it always gets fp32 tiles. On GPU
    fp32 inputs follow torch's matmul precision setting ("highest" -> exact IEEE fp32).
    """
    if interpreting():
        return True, "ieee"
    if dtype == torch.float32:
        return False, "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return False, "tf32"  # ignored for 16-bit operands


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, n_hid, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """hidden[rows] @ weight[cols]^T as a [BLOCK_M, BLOCK_N] fp32 tile (no temperature)."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None] * stride_h + offs_k[None, :]
    w_ptrs = w_ptr + cols[None, :] * stride_w + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_hid, BLOCK_K):
        k_ok = (k0 + offs_k) < n_hid
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc


@triton.jit
def _fwd_stats_kernel(h_ptr, w_ptr, lab_ptr, m_ptr, s_ptr, t_ptr, y_ptr,
                      n_tok, n_hid, n_valid, split_cols, stride_h, stride_w, stride_p,
                      INV_TAU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_tok
    # Local label (column index in this shard), -1 when off-shard / ignored.
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1)

    m = tl.full([BLOCK_M], NEG_INF, dtype=tl.float32)  # max identity is -inf, never 0
    s = tl.zeros([BLOCK_M], dtype=tl.float32)
    t = tl.zeros([BLOCK_M], dtype=tl.float32)
    y = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_lo = pid_s * split_cols
    n_hi = tl.minimum(n_lo + split_cols, n_valid)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < n_hi
        x = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, n_hid, stride_h, stride_w,
                         BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION) * INV_TAU
        # Columns past the real vocabulary (ragged tile, checkpoint padding) are -inf, not the
        # logit 0 their zero-filled weight loads would give.
        x = tl.where(col_ok[None, :], x, NEG_INF)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        xs = x - m_ref[:, None]
        e = tl.exp(xs)  # 0 on masked columns
        # t is kept relative to the running max: t <- alpha * (t + (m - m_new) * s) + sum e*xs.
        # (The where()s keep -inf * 0 out of the arithmetic.)
        shift = (tl.where(s > 0.0, m, m_ref) - m_ref) * s
        t = alpha * (t + shift) + tl.sum(e * tl.where(col_ok[None, :], xs, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        hit = (cols[None, :] == lab[:, None]) & col_ok[None, :]
        y += tl.sum(tl.where(hit, x, 0.0), axis=1)

    p_off = rows * stride_p + pid_s
    tl.store(m_ptr + p_off, m, mask=row_ok)
    tl.store(s_ptr + p_off, s, mask=row_ok)
    tl.store(t_ptr + p_off, t, mask=row_ok)
    tl.store(y_ptr + p_off, y, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, lab_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, d_ptr,
                    n_tok, n_hid, col0, n_cols, stride_h, stride_w, stride_d,
                    INV_TAU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < n_tok
    rel = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # column inside this split
    col_ok = rel < n_cols
    cols = col0 + rel
    x = _logits_tile(h_ptr, w_ptr, rows, row_ok, cols, col_ok, n_hid, stride_h, stride_w,
                     BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, PRECISION) * INV_TAU
    lab = tl.load(lab_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_h = tl.load(gh_ptr + rows, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    logp = tl.where(ok, x - lse[:, None], 0.0)  # keeps exp() finite on masked lanes
    p = tl.exp(logp)
    # d logp_y / dx = onehot - p;  d H / dx = -p * (x - sum p x) = -p * (log p + H)
    d = -p * (g_lp[:, None] + g_h[:, None] * (logp + ent[:, None]))
    hit = cols[None, :] == lab[:, None]
    d = d + tl.where(hit, g_lp[:, None], 0.0)
    d = tl.where(ok, d * INV_TAU, 0.0)
    tl.store(d_ptr + rows[:, None] * stride_d + rel[None, :], d.to(d_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                 stride_cm, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr):
    """C[M, N] (+)= A[M, K] @ B[K, N] with an fp32 accumulator; C's last dim is contiguous."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)  # int32 keeps the contiguity analysis (vector loads)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


class _on_device:
    """Make `device` current for the launches (Triton launches on the current CUDA device)."""

    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def forward_partials(hidden: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor,
                     n_valid: int, inv_tau: float):
    """Per-split partial statistics, each [T, splits] fp32: (max, sum-exp, shifted sum, target).

    hidden [T, H] and weight [V_local, H] contiguous, same dtype; labels_local [T] int64 column
    ids in this shard (-1 elsewhere); only columns < n_valid take part.
    """
    T, H = hidden.shape
    cfg = _config(hidden.dtype)
    dot_fp32, precision = _dot_flags(hidden.dtype)
    n_m = triton.cdiv(T, cfg.block_m)
    if cfg.fwd_split_cols > 0:
        split = cfg.fwd_split_cols
    else:
        want = max(1, triton.cdiv(4 * _sm_count(hidden.device), n_m))
        split = triton.cdiv(n_valid, want)
    split = max(cfg.block_n, triton.cdiv(split, cfg.block_n) * cfg.block_n)
    n_splits = triton.cdiv(n_valid, split)
    kw = dict(device=hidden.device, dtype=torch.float32)
    m = torch.empty(T, n_splits, **kw)
    s = torch.empty(T, n_splits, **kw)
    t = torch.empty(T, n_splits, **kw)
    y = torch.empty(T, n_splits, **kw)
    with _on_device(hidden.device):
        _fwd_stats_kernel[(n_m, n_splits)](
            hidden, weight, labels_local, m, s, t, y,
            T, H, n_valid, split, hidden.stride(0), weight.stride(0), n_splits,
            INV_TAU=inv_tau, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            DOT_FP32=dot_fp32, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return m, s, t, y


def _gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool, cfg: Config,
          dot_fp32: bool, precision: str) -> None:
    M, K = a.shape
    N = b.shape[1]
    assert c.shape == (M, N) and c.stride(1) == 1
    grid = (triton.cdiv(M, cfg.gemm_block_m), triton.cdiv(N, cfg.gemm_block_n))
    _gemm_kernel[grid](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        ACCUMULATE=accumulate, BLOCK_M=cfg.gemm_block_m, BLOCK_N=cfg.gemm_block_n,
        BLOCK_K=cfg.gemm_block_k, DOT_FP32=dot_fp32, PRECISION=precision,
        num_warps=cfg.gemm_num_warps, num_stages=cfg.gemm_num_stages,
    )


def backward_grads(hidden: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor,
                   n_valid: int, inv_tau: float, lse: torch.Tensor, ent: torch.Tensor,
                   g_lp: torch.Tensor, g_h: torch.Tensor, need_dh: bool, need_dw: bool):
    """(d_hidden as an fp32 [T, H] buffer or None, d_weight in weight's dtype or None).

    lse, ent, g_lp, g_h: [T] fp32, global (after the TP reduction), with g_lp = g_h = 0 on
    ignored tokens. d_hidden is this shard's partial sum (the caller all-reduces it).
    """
    T, H = hidden.shape
    dev = hidden.device
    dh = torch.zeros(T, H, device=dev, dtype=torch.float32) if need_dh else None
    dw = torch.zeros_like(weight) if need_dw else None
    if T == 0 or n_valid == 0 or not (need_dh or need_dw):
        return dh, dw
    cfg = _config(hidden.dtype)
    dot_fp32, precision = _dot_flags(hidden.dtype)
    d_dtype = torch.float32 if weight.dtype in (torch.float32, torch.float64) else weight.dtype
    if cfg.bwd_split_cols > 0:
        split = cfg.bwd_split_cols
    else:
        elem = torch.finfo(d_dtype).bits // 8
        split = (cfg.bwd_buffer_bytes // (elem * T)) // 256 * 256
    split = max(cfg.block_n, min(split, triton.cdiv(n_valid, cfg.block_n) * cfg.block_n))
    dl = torch.empty(T, split, device=dev, dtype=d_dtype)
    with _on_device(dev):
        for col0 in range(0, n_valid, split):
            n_cols = min(split, n_valid - col0)
            grid = (triton.cdiv(T, cfg.block_m), triton.cdiv(n_cols, cfg.block_n))
            _dlogits_kernel[grid](
                hidden, weight, labels_local, lse, ent, g_lp, g_h, dl,
                T, H, col0, n_cols, hidden.stride(0), weight.stride(0), dl.stride(0),
                INV_TAU=inv_tau, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, DOT_FP32=dot_fp32, PRECISION=precision,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            d_blk = dl[:, :n_cols]
            if need_dh:  # d_hidden (fp32, across splits) += dlogits @ W_split
                _gemm(d_blk, weight[col0:col0 + n_cols], dh, col0 > 0, cfg, dot_fp32, precision)
            if need_dw:  # d_weight rows of this split = dlogits^T @ hidden (fp32 over all tokens)
                _gemm(d_blk.t(), hidden, dw[col0:col0 + n_cols], False, cfg, dot_fp32, precision)
    return dh, dw
