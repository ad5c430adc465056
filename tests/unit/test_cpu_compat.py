"""The CPU compatibility layer, exercised inside a fresh rank process (it patches torch globally)."""
import pytest
import torch

from eureka_megatron.runtime.launcher import launch


def _probe():
    from eureka_megatron.config import ParallelConfig
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(), seed=5)
    from megatron.core import tensor_parallel

    out = {"type": torch.zeros(2).type(), "explicit_type": torch.zeros(2).type(torch.float64).dtype,
           "device": str(torch.empty(3, device="cuda").device),
           "to": str(torch.ones(1).to(torch.cuda.current_device()).device)}
    tracker = tensor_parallel.get_cuda_rng_tracker()
    torch.manual_seed(0)
    plain = torch.rand(4)
    torch.manual_seed(0)
    with tracker.fork():
        forked1 = torch.rand(4)
    after = torch.rand(4)
    with tracker.fork():
        forked2 = torch.rand(4)
    out.update(plain=plain, after=after, forked1=forked1, forked2=forked2)
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inert with CUDA")
def test_cpu_layer_behaviour():
    r = launch(_probe, 1)[0]
    assert r["type"] == "torch.cuda.FloatTensor"  # megatron's grad-type assertions pass
    assert r["explicit_type"] == torch.float64  # casting through .type(dtype) still works
    assert r["device"] == "cpu" and r["to"] == "cpu"
    # The model-parallel RNG tracker really switches streams (megatron's own setter defers
    # through torch.cuda._lazy_call, which never runs without CUDA):
    assert torch.equal(r["after"], r["plain"])  # the default stream is untouched by a fork
    assert not torch.equal(r["forked1"], r["plain"])
    assert not torch.equal(r["forked1"], r["forked2"])  # the tracker's stream advances
