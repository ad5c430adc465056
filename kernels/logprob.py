"""Per-token log-probabilities and entropies straight from the lm_head, without the logits.

    logprobs, entropy = logprob_entropy(hidden[T, H], weight[V_local, H], labels[T],
                                        temperature=1.0, vocab_size=None, tp_group=None,
                                        backend=None)

computes, for logits x = hidden @ weight^T / temperature over the real vocabulary,
logprobs[t] = x[t, labels[t]] - logsumexp(x[t]) and entropy[t] = logsumexp(x[t]) - sum p*x,
both float32 (float64 for float64 inputs on the torch backend), differentiable w.r.t. hidden and
weight.

Why it is built this way:

* Never materialise logits. RL needs these two numbers per token for the policy, old-policy and
  reference passes, and a [T, V] tensor is 5-10 GB per micro-batch at V ~ 150k (fp32 copies and
  the saved softmax double that). Both backends tile the vocabulary with an online log-sum-exp
  in fp32: per token only (max m, sum-exp s = sum exp(x - m), shifted sum t = sum
  exp(x - m) * (x - m), target logit) survive, and entropy = log s - t / s. The backward
  recomputes the logits tile by tile; hidden and weight gradients accumulate in fp32 and are
  cast to the input dtypes once at the end (summing per-split gradients in bf16 is the
  convergence bug Megatron had to fix).
* Tensor parallelism. With `tp_group`, `weight` is this rank's vocabulary shard (global rows
  rank*V_local ... (rank+1)*V_local - 1). Only per-token statistics cross ranks: an all-reduce
  MAX of the max, then one SUM of the rescaled (s, t, target logit) -- 16 bytes per token instead
  of gathering logits. `labels` are global ids; the rank that owns the label contributes the
  target logit, the others 0. The backward's hidden gradient is a partial sum over the local
  vocabulary and is all-reduced (SUM, in fp32) over the group; the weight gradient stays local.
* Padding. Rows with global id >= `vocab_size` (the checkpoint's padded vocabulary, default
  V_local * tp_size) and the ragged part of the last tile are -inf before the max / exp, never
  the logit 0 that zero-filled loads give: that would add exp(0 - max) per padded column, which
  dominates when all real logits are negative and corrupts peaked RL distributions. The running
  max starts at -inf for the same reason (a 0 identity breaks shift invariance). Padded rows
  get zero weight gradient.
* Ignored labels. Tokens with `labels < 0` (e.g. -100 for prompt / image positions) return
  logprob 0 and entropy 0, and their upstream gradients are zeroed before anything is summed
  into the weight gradient, so they contribute no gradient at all.

Backends: "triton" (the default on CUDA tensors; on CPU tensors it runs through Triton's
interpreter when TRITON_INTERPRET=1 was set before Triton was imported -- a check of the kernel
at several times the torch backend's time, so only when asked for) -- see `_logprob_triton.py`;
"torch" -- a
plain-torch reference with the same decomposition, chunked over tokens (and vocabulary) so it also
never builds [T, V]; it computes in float64 for float64 inputs (the checkable ground truth) and
is the fallback where Triton cannot run. The Triton backend hands float64 inputs to the torch
backend. Labels must be < vocab_size: that is not checked (it would cost a device sync), and a
label on a padded row is scored as if its logit were 0.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch
import torch.distributed as dist

from .options import BACKENDS

__all__ = ["logprob_entropy", "triton_usable"]

# Torch backend block: _TORCH_CHUNK_T tokens x _TORCH_CHUNK_V vocabulary rows at a time.
_TORCH_CHUNK_T = 1024
_TORCH_CHUNK_V = 16384


def triton_usable(device: torch.device | str) -> bool:
    """Whether the Triton backend can run for tensors on `device`."""
    device = torch.device(device)
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        mod = sys.modules.get("eureka_megatron.kernels._logprob_triton")
        if mod is not None:  # decorated already: interpreted or compiled for good
            return mod.interpreting()
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return False


def _triton_module():
    from eureka_megatron.kernels import _logprob_triton

    return _logprob_triton


# ----------------------------------------------------------------------------------------------
# statistics shared by both backends
# ----------------------------------------------------------------------------------------------


def _merge(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, dim: int = -1):
    """Merge partial (max, sum-exp, shifted sum) along `dim`.

    Partial i covers some columns with m_i = max x, s_i = sum exp(x - m_i) and
    t_i = sum exp(x - m_i) * (x - m_i); empty partials are (-inf, 0, 0).
    """
    M = m.amax(dim=dim, keepdim=True)
    M_ref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    a = torch.exp(m - M_ref)  # 0 for empty partials
    shift = (torch.where(s > 0, m, M_ref) - M_ref) * s  # 0 for empty partials, no -inf * 0
    S = (a * s).sum(dim=dim)
    Tt = (a * (t + shift)).sum(dim=dim)
    return M.squeeze(dim), S, Tt


def _tp_reduce(m, s, t, y, group):
    """Across the TP group: MAX of the max, then one SUM of the rescaled (s, t, target)."""
    M = m.clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    M_ref = torch.where(M == float("-inf"), torch.zeros_like(M), M)
    a = torch.exp(m - M_ref)
    shift = (torch.where(s > 0, m, M_ref) - M_ref) * s  # 0 for empty partials, no -inf * 0
    packed = torch.stack([a * s, a * (t + shift), y])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return M, packed[0], packed[1], packed[2]


# ----------------------------------------------------------------------------------------------
# torch backend
# ----------------------------------------------------------------------------------------------


def _blocks(n: int, step: int):
    for a in range(0, n, step):
        yield a, min(n, a + step)


def _torch_stats(hidden, weight, labels_local, n_valid, inv_tau, cdt):
    """Local (max, sum-exp, shifted sum, target logit), each [T] in `cdt`."""
    T = hidden.shape[0]
    kw = dict(device=hidden.device, dtype=cdt)
    m = torch.full((T,), float("-inf"), **kw)
    s = torch.zeros(T, **kw)
    t = torch.zeros(T, **kw)
    y = torch.zeros(T, **kw)
    ct, cv = max(1, _TORCH_CHUNK_T), max(1, _TORCH_CHUNK_V)
    for t0, t1 in _blocks(T, ct):
        h = hidden[t0:t1].to(cdt)
        lab = labels_local[t0:t1]
        parts = []
        for v0, v1 in _blocks(n_valid, cv):
            x = (h @ weight[v0:v1].to(cdt).t()) * inv_tau  # only real vocabulary rows
            bm = x.amax(dim=1)
            xs = x - bm[:, None]
            e = torch.exp(xs)
            parts.append((bm, e.sum(dim=1), (e * xs).sum(dim=1)))
            hit = (lab >= v0) & (lab < v1)
            idx = torch.where(hit, lab - v0, torch.zeros_like(lab))
            y[t0:t1] += torch.where(hit, x.gather(1, idx[:, None]).squeeze(1), 0.0)
        if parts:
            m[t0:t1], s[t0:t1], t[t0:t1] = _merge(*(torch.stack(z, dim=1) for z in zip(*parts)))
    return m, s, t, y


def _torch_grads(hidden, weight, labels_local, n_valid, inv_tau, lse, ent, g_lp, g_h,
                 need_dh, need_dw, cdt):
    """(d_hidden [T, H] in cdt -- this shard's partial sum, d_weight [V_local, H] in cdt)."""
    T, H = hidden.shape
    kw = dict(device=hidden.device, dtype=cdt)
    dh = torch.zeros(T, H, **kw) if need_dh else None
    dw = torch.zeros(weight.shape[0], H, **kw) if need_dw else None
    ct, cv = max(1, _TORCH_CHUNK_T), max(1, _TORCH_CHUNK_V)
    for t0, t1 in _blocks(T, ct):
        h = hidden[t0:t1].to(cdt)
        lab = labels_local[t0:t1]
        l_, e_ = lse[t0:t1, None], ent[t0:t1, None]
        gl, gh = g_lp[t0:t1, None], g_h[t0:t1, None]
        for v0, v1 in _blocks(n_valid, cv):
            w = weight[v0:v1].to(cdt)
            x = (h @ w.t()) * inv_tau
            logp = x - l_
            p = torch.exp(logp)
            d = -p * (gl + gh * (logp + e_))
            hit = (lab >= v0) & (lab < v1)
            rows = torch.nonzero(hit).squeeze(1)
            d[rows, lab[rows] - v0] += gl[rows, 0]
            d *= inv_tau
            if need_dh:
                dh[t0:t1] += d @ w
            if need_dw:
                dw[v0:v1] += d.t() @ h
    return dh, dw


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class _LogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, inv_tau, vocab_start, n_valid, group, backend):
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 math, whatever the caller
            return _LogprobEntropy._forward(ctx, hidden, weight, labels, inv_tau, vocab_start,
                                            n_valid, group, backend)

    @staticmethod
    def _forward(ctx, hidden, weight, labels, inv_tau, vocab_start, n_valid, group, backend):
        cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # This shard's column of each label; -1 when ignored, off-shard or on a padded row.
        local = labels - vocab_start
        on_shard = (labels >= 0) & (local >= 0) & (local < n_valid)
        labels_local = torch.where(on_shard, local, torch.full_like(local, -1))

        T = hidden.shape[0]
        if backend == "triton":
            if T > 0 and n_valid > 0:
                parts = _triton_module().forward_partials(hidden, weight, labels_local, n_valid,
                                                          inv_tau)
                m, s, t = _merge(*parts[:3])
                y = parts[3].sum(dim=1)
            else:
                m = torch.full((T,), float("-inf"), device=hidden.device, dtype=cdt)
                s, t, y = (torch.zeros(T, device=hidden.device, dtype=cdt) for _ in range(3))
        else:
            m, s, t, y = _torch_stats(hidden, weight, labels_local, n_valid, inv_tau, cdt)
        if group is not None:
            m, s, t, y = _tp_reduce(m, s, t, y, group)

        log_s = torch.log(s)
        lse = m + log_s
        ent = log_s - t / s
        valid = labels >= 0
        zero = torch.zeros_like(lse)
        logprobs = torch.where(valid, y - lse, zero)
        entropy = torch.where(valid, ent, zero)

        ctx.save_for_backward(hidden, weight, labels_local, valid, lse, ent)
        ctx.inv_tau, ctx.n_valid, ctx.group, ctx.backend = inv_tau, n_valid, group, backend
        ctx.device_type = hidden.device.type
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        with torch.autocast(ctx.device_type, enabled=False):
            return _LogprobEntropy._backward(ctx, g_lp, g_h)

    @staticmethod
    def _backward(ctx, g_lp, g_h):
        hidden, weight, labels_local, valid, lse, ent = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return (None,) * 8
        cdt = lse.dtype
        zero = torch.zeros_like(lse)
        # Ignored tokens: upstream gradients zeroed before any reduction over tokens.
        g_lp = zero if g_lp is None else torch.where(valid, g_lp.to(cdt), zero).contiguous()
        g_h = zero if g_h is None else torch.where(valid, g_h.to(cdt), zero).contiguous()
        args = (hidden, weight, labels_local, ctx.n_valid, ctx.inv_tau, lse, ent, g_lp, g_h,
                need_dh, need_dw)
        if ctx.backend == "triton":
            dh, dw = _triton_module().backward_grads(*args)
        else:
            dh, dw = _torch_grads(*args, cdt)
        if need_dh and ctx.group is not None:
            dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.group)
        dh = dh.to(hidden.dtype) if need_dh else None
        dw = dw.to(weight.dtype) if need_dw else None
        return dh, dw, None, None, None, None, None, None


def logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                    temperature: float = 1.0, vocab_size: int | None = None, tp_group=None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `labels` and entropy per token under softmax(hidden @ weight^T / τ).

    Args:
        hidden: [T, H] (leading dims are flattened; outputs take labels' shape).
        weight: [V_local, H], this rank's vocabulary shard under `tp_group`, same dtype as hidden.
        labels: [T] global token ids; < 0 means ignored (logprob 0, entropy 0, no gradient).
        temperature: logits are divided by it (> 0).
        vocab_size: real vocabulary size; global rows >= it are padding and excluded.
            Defaults to V_local * tp_size.
        tp_group: torch.distributed group sharding the vocabulary, or None.
        backend: "triton", "torch" or None (Triton wherever it can run, else torch).

    Returns:
        (logprobs, entropy), float32 (float64 for float64 inputs), differentiable w.r.t.
        hidden and weight.
    """
    if hidden.dim() < 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [T, H] and weight [V_local, H]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    H = hidden.shape[-1]
    if weight.shape[1] != H:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)}, "
                         f"weight {tuple(weight.shape)}")
    out_shape = labels.shape
    hidden2 = hidden.reshape(-1, H)
    if labels.numel() != hidden2.shape[0]:
        raise ValueError(f"labels has {labels.numel()} entries for {hidden2.shape[0]} tokens")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError("hidden, weight and labels must be on one device")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    if tp_group is not None and dist.get_world_size(tp_group) == 1:
        tp_group = None
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
    V_local = weight.shape[0]
    if vocab_size is None:
        vocab_size = V_local * tp_size
    vocab_size = int(vocab_size)
    if not 0 < vocab_size <= V_local * tp_size:
        raise ValueError(f"vocab_size={vocab_size} must be in (0, {V_local * tp_size}] "
                         f"(V_local={V_local}, tp_size={tp_size})")
    vocab_start = tp_rank * V_local
    n_valid = max(0, min(V_local, vocab_size - vocab_start))  # real rows in this shard

    if backend is None:
        compiled = hidden.device.type == "cuda" and triton_usable(hidden.device)
        backend = "triton" if compiled else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton":
        if not triton_usable(hidden.device):
            raise RuntimeError(f"the triton backend cannot run on {hidden.device} here (needs "
                               "CUDA, or TRITON_INTERPRET=1 for CPU tensors)")
        if hidden.dtype == torch.float64:
            backend = "torch"  # float64 ground truth; Triton kernels accumulate in fp32

    logprobs, entropy = _LogprobEntropy.apply(
        hidden2.contiguous(), weight.contiguous(), labels.reshape(-1).to(torch.int64).contiguous(),
        1.0 / temperature, vocab_start, n_valid, tp_group, backend)
    return logprobs.reshape(out_shape), entropy.reshape(out_shape)
