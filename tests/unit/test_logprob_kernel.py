"""logprob_entropy (kernels/logprob.py) against a float64 full-logits reference, both backends.

Without a GPU the Triton kernels run in the interpreter: TRITON_INTERPRET must be set before
Triton decorates them, hence the setdefault before the import. Shapes are small and odd so that
no dimension is a multiple of any tile, and the interpreter configuration uses small tiles and
vocab splits so the ragged-tile masks and multi-split merges are exercised.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eureka_megatron.kernels import logprob as lp_mod  # noqa: E402
from eureka_megatron.kernels.logprob import logprob_entropy  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, H, V = 37, 24, 300
TRITON_OK = lp_mod.triton_usable(torch.device(DEVICE))
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="Triton cannot run")),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: intra-op threads only add contention on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _small_torch_chunks(monkeypatch):
    # Several token and vocabulary chunks in the torch backend, ragged at both ends.
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_T", 8)
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_V", 64)


def reference(hidden, weight, labels, temperature=1.0, vocab_size=None):
    """float64 log-probs and entropies from materialised logits over the real vocabulary."""
    vocab_size = weight.shape[0] if vocab_size is None else vocab_size
    x = (hidden.double() @ weight.double()[:vocab_size].t()) / temperature
    logp = torch.log_softmax(x, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    valid = labels >= 0
    tgt = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
    return tgt * valid, ent * valid


def reference_grads(hidden, weight, labels, g_lp, g_h, **kw):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    lp, ent = reference(h, w, labels, **kw)
    ((lp * g_lp.double()).sum() + (ent * g_h.double()).sum()).backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def run(backend, hidden, weight, labels, g_lp, g_h, **kw):
    h = hidden.detach().clone().to(DEVICE).requires_grad_()
    w = weight.detach().clone().to(DEVICE).requires_grad_()
    lp, ent = logprob_entropy(h, w, labels.to(DEVICE), backend=backend, **kw)
    ((lp * g_lp.to(DEVICE, lp.dtype)).sum() + (ent * g_h.to(DEVICE, lp.dtype)).sum()).backward()
    return lp.detach().cpu(), ent.detach().cpu(), h.grad.cpu(), w.grad.cpu()


def assert_rel(actual, expected, tol, name):
    """|a - e| <= tol * (|e| + max|e|): relative, with the tensor's scale as the floor."""
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, name
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    scale = e.abs().max().clamp_min(1e-300)
    err = (a - e).abs()
    bad = err > tol * (e.abs() + scale)
    assert not bad.any(), (f"{name}: max abs err {err.max():.3e}, scale {scale:.3e}, "
                           f"{int(bad.sum())} entries over {tol:g} relative")


def make_case(kind, seed=0):
    """(hidden, weight, labels, kwargs) in float64 for one scenario."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    kw = {}
    vocab = V
    if kind in ("padded", "peaked", "negative", "ignored"):
        vocab = 283
        kw["vocab_size"] = vocab
        # Garbage in the padded rows: any leak into the softmax is enormous.
        weight[vocab:] = 5.0 * torch.randn(V - vocab, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (T,), generator=g)
    labels[-1] = vocab - 1  # last real row, in the ragged last tile
    if kind == "peaked":
        # One huge logit (~ +100) on peak[t] for most rows; half the labels sit on the peak
        # (logp ~ 0), the other half elsewhere (logp ~ -100). The last rows keep an ordinary
        # spread so the entropies have an O(1) scale (a peaked row's entropy is ~1e-30, known
        # only to fp32's absolute precision).
        n_peaked = 2 * T // 3
        peak = torch.randperm(vocab, generator=g)[:n_peaked]
        unit = hidden[:n_peaked] / hidden[:n_peaked].norm(dim=1, keepdim=True)
        weight[peak] = 20.0 * unit
        labels[:n_peaked] = torch.where(torch.arange(n_peaked) % 2 == 0, peak,
                                        labels[:n_peaked])
    elif kind == "negative":
        # Every real logit around -100 (exp(-100) underflows fp32 without the max shift, so a
        # 0 max identity shows); the padded rows are zero, i.e. logit 0, far above every real
        # one if they leaked. The bias sits in a hidden feature (x = -100 * 1 + ...), which
        # keeps the gradients well conditioned: a -100 weight column would make
        # d_hidden[:, 0] = -100 * sum_j dlogits_j, a cancellation to ~0 that fp32 logits of
        # magnitude 100 (ulp 7.6e-6) cannot resolve to 1e-5.
        hidden[:, 0] = -100.0
        weight[:, 0] = 1.0
        weight[vocab:] = 0.0
    elif kind == "temperature":
        kw["temperature"] = 0.6
    elif kind == "ignored":
        labels[::3] = -100
        kw["temperature"] = 1.7
    return hidden, weight, labels, kw


KINDS = ["odd", "padded", "peaked", "negative", "temperature", "ignored"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_matches_float64_reference(backend, kind):
    hidden, weight, labels, kw = make_case(kind)
    g = torch.Generator().manual_seed(1)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_h = torch.randn(T, generator=g, dtype=torch.float64)
    h32, w32 = hidden.float(), weight.float()
    ref = reference_grads(h32, w32, labels, g_lp, g_h, **kw)
    out = run(backend, h32, w32, labels, g_lp, g_h, **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == torch.float32 and out[3].dtype == torch.float32
    for name, a, e in zip(["logprobs", "entropy", "d_hidden", "d_weight"], out, ref):
        assert_rel(a, e, 1e-5, f"{backend}/{kind}/{name}")
    vocab = kw.get("vocab_size", V)
    assert (out[3][vocab:] == 0).all(), "padded rows got a gradient"
    if kind == "ignored":
        ign = labels < 0
        assert (out[0][ign] == 0).all() and (out[1][ign] == 0).all()
        assert (out[2][ign] == 0).all(), "ignored tokens produced a hidden gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_contribute_nothing(backend):
    """The weight gradient equals the one computed on the valid tokens alone."""
    hidden, weight, labels, kw = make_case("ignored", seed=3)
    g = torch.Generator().manual_seed(4)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_h = torch.randn(T, generator=g, dtype=torch.float64)
    h32, w32 = hidden.float(), weight.float()
    full = run(backend, h32, w32, labels, g_lp, g_h, **kw)
    keep = labels >= 0
    sub = run(backend, h32[keep], w32, labels[keep], g_lp[keep], g_h[keep], **kw)
    assert_rel(full[3], sub[3], 1e-5, "d_weight")
    assert_rel(full[0][keep], sub[0], 1e-6, "logprobs")
    assert_rel(full[2][keep], sub[2], 1e-6, "d_hidden")


def test_torch_backend_float64_is_ground_truth():
    hidden, weight, labels, kw = make_case("peaked", seed=5)
    g = torch.Generator().manual_seed(6)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_h = torch.randn(T, generator=g, dtype=torch.float64)
    ref = reference_grads(hidden, weight, labels, g_lp, g_h, **kw)
    out = run("torch", hidden, weight, labels, g_lp, g_h, **kw)
    assert out[0].dtype == torch.float64
    for name, a, e in zip(["logprobs", "entropy", "d_hidden", "d_weight"], out, ref):
        assert_rel(a, e, 1e-12, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs(backend, dtype, tol):
    hidden, weight, labels, kw = make_case("padded", seed=7)
    kw["temperature"] = 0.9
    g = torch.Generator().manual_seed(8)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_h = torch.randn(T, generator=g, dtype=torch.float64)
    h16, w16 = hidden.to(dtype), weight.to(dtype)
    ref = reference_grads(h16, w16, labels, g_lp, g_h, **kw)  # float64 on the rounded inputs
    out = run(backend, h16, w16, labels, g_lp, g_h, **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert out[2].dtype == dtype and out[3].dtype == dtype
    # Logits are exact fp16/bf16 products accumulated in fp32: values are fp32-accurate.
    assert_rel(out[0], ref[0], 1e-5, "logprobs")
    assert_rel(out[1], ref[1], 1e-5, "entropy")
    assert_rel(out[2], ref[2], tol, "d_hidden")
    assert_rel(out[3], ref[3], tol, "d_weight")


@pytest.mark.skipif(not TRITON_OK, reason="Triton cannot run")
def test_triton_adaptive_splits_and_other_tiles(monkeypatch):
    """Another tiling: adaptive vocab splits, one backward split, bigger tiles."""
    from eureka_megatron.kernels import _logprob_triton as tri

    monkeypatch.setattr(tri, "CONFIG_OVERRIDE", tri.Config(
        block_m=32, block_n=64, block_k=32, gemm_block_m=32, gemm_block_n=16, gemm_block_k=64,
        fwd_split_cols=0, bwd_split_cols=0))
    hidden, weight, labels, kw = make_case("ignored", seed=9)
    g = torch.Generator().manual_seed(10)
    g_lp = torch.randn(T, generator=g, dtype=torch.float64)
    g_h = torch.randn(T, generator=g, dtype=torch.float64)
    h32, w32 = hidden.float(), weight.float()
    ref = reference_grads(h32, w32, labels, g_lp, g_h, **kw)
    out = run("triton", h32, w32, labels, g_lp, g_h, **kw)
    for name, a, e in zip(["logprobs", "entropy", "d_hidden", "d_weight"], out, ref):
        assert_rel(a, e, 1e-5, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_output_and_one_input_grad(backend):
    """Only logprobs used, only hidden needs a gradient; batch dims are flattened."""
    hidden, weight, labels, kw = make_case("padded", seed=11)
    h = hidden[:36].float().reshape(4, 9, H).to(DEVICE).requires_grad_()
    w = weight.float().to(DEVICE)
    lab = labels[:36].reshape(4, 9).to(DEVICE)
    lp, ent = logprob_entropy(h, w, lab, backend=backend, **kw)
    assert lp.shape == (4, 9) and ent.shape == (4, 9)
    lp.sum().backward()
    hr = hidden[:36].float().requires_grad_()
    ref_lp, _ = reference(hr, weight.float(), labels[:36], **kw)
    ref_lp.sum().backward()
    assert_rel(lp.detach().cpu().reshape(-1), ref_lp.detach(), 1e-5, "logprobs")
    assert_rel(h.grad.cpu().reshape(-1, H), hr.grad, 1e-5, "d_hidden")


def test_backends_agree_and_default_backend():
    hidden, weight, labels, kw = make_case("temperature", seed=12)
    a = logprob_entropy(hidden.float(), weight.float(), labels, backend="torch", **kw)
    b = logprob_entropy(hidden.float(), weight.float(), labels, **kw)  # default backend
    for x, y in zip(a, b):
        assert_rel(x, y, 1e-5, "default vs torch")
    if TRITON_OK:
        assert lp_mod.triton_usable(torch.device(DEVICE))


def test_bad_arguments():
    h = torch.randn(5, 8)
    w = torch.randn(11, 8)
    lab = torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="hidden size"):
        logprob_entropy(h, torch.randn(11, 7), lab)
    with pytest.raises(ValueError, match="labels"):
        logprob_entropy(h, w, lab[:4])
    with pytest.raises(ValueError, match="dtypes"):
        logprob_entropy(h, w.double(), lab)
    with pytest.raises(ValueError, match="vocab_size"):
        logprob_entropy(h, w, lab, vocab_size=12)
    with pytest.raises(ValueError, match="temperature"):
        logprob_entropy(h, w, lab, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        logprob_entropy(h, w, lab, backend="cuda")


def test_autocast_does_not_lower_precision():
    """Under autocast the torch backend still computes its logits in fp32."""
    hidden, weight, labels, kw = make_case("temperature", seed=13)
    h32, w32 = hidden.float(), weight.float()
    ref_lp, ref_ent = reference(h32, w32, labels, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = logprob_entropy(h32, w32, labels, backend="torch", **kw)
    assert lp.dtype == torch.float32
    assert_rel(lp, ref_lp, 1e-5, "logprobs")
    assert_rel(ent, ref_ent, 1e-5, "entropy")
