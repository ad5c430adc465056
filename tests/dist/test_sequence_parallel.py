"""Sequence parallelism changes nothing but memory (real gloo ranks, fp32).

The RL step of the demo's Qwen2.5-VL (images merged into the embeddings before the sequence is
split, the fused log-probs on the gathered hidden states) gives the same log-probs and, on every
rank, the same gradients with `parallel.sequence_parallel` as without, at TP2 and TP2 x PP2 --
the norms' included, which each rank computes on its slice of the sequence and megatron sums
over TP. A run that silently left sequence parallelism off would not scatter."""
import pytest
import torch

from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.batches import Sequence
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint


def rl_step(cfg):
    """Rank function: one policy-loss forward/backward over rollout-like sequences; (log-probs
    at the response tokens on the last stage, else None; trainable gradients by name; the calls
    to megatron's sequence-parallel scatter)."""
    from megatron.core import tensor_parallel

    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.actor import Actor
    from eureka_megatron.trainer.train_step import run_forward_backward

    calls, scatter = [0], tensor_parallel.scatter_to_sequence_parallel_region

    def counted(*args, **kwargs):
        calls[0] += 1
        return scatter(*args, **kwargs)

    tensor_parallel.scatter_to_sequence_parallel_region = counted
    init_distributed(cfg.parallel, seed=1)
    actor = Actor(cfg, need_reference=False)
    gen = torch.Generator().manual_seed(0)
    img = actor.model_cfg.image_token_id
    prompt = [1, 3] + [img] * 4 + [4, 50, 51]
    seqs = []
    for g in range(2):
        mm = {"pixel_values": torch.randn(16, 1176, generator=gen),
              "image_grid_thw": torch.tensor([[1, 4, 4]])}
        for j in range(3):  # odd and even lengths: widths padded for SP
            resp = torch.randint(8, 60, (2 + j,), generator=gen).tolist()
            seqs.append(Sequence(prompt, resp, mm, [0.0] * len(resp), group=g))
    mbs = actor.micro_batches(seqs, 0)
    for mb in mbs:
        mb["advantages"] = mb["loss_mask"].sum(1) - 2.5
    lps = actor.forward_logprobs(mbs)
    for c in actor.model.chunks:
        c.zero_grad_buffer()
    run_forward_backward(actor.model, mbs, actor.policy_forward())
    grads = {n: p.main_grad.clone() for c in actor.model.chunks
             for n, p in c.named_parameters() if p.requires_grad}
    last = lps and lps[0] is not None
    lp = torch.cat([lp[mb["loss_mask"] != 0] for lp, mb in zip(lps, mbs)]) if last else None
    return lp, grads, calls[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2_pp2"])
def test_sequence_parallel_rl_step_equals_without(tmp_path, tp, pp):
    hf = write_tiny_checkpoint(tmp_path / "hf", seed=0)
    common = [f"model.hf={hf}", "warmup.steps=0", "algo.kl_coef=0",
              f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}",
              f"parallel.nproc={tp * pp}"]
    plain = launch(rl_step, tp * pp, demo_config(tmp_path / "a", common))
    sp = launch(rl_step, tp * pp, demo_config(tmp_path / "b", common + ["parallel.sequence_parallel=true"]))
    assert all(r[2] == 0 for r in plain) and any(r[2] > 0 for r in sp)
    lp_plain = next(r[0] for r in plain if r[0] is not None)
    lp_sp = next(r[0] for r in sp if r[0] is not None)
    torch.testing.assert_close(lp_sp, lp_plain, rtol=1e-6, atol=1e-6)
    for (_, g_plain, _), (_, g_sp, _) in zip(plain, sp):
        assert g_plain.keys() == g_sp.keys()
        for name in g_plain:
            a, b = g_plain[name], g_sp[name]
            assert (a - b).abs().max() <= 1e-6 * max(a.abs().max(), 1e-12) + 1e-9, name
    norms = [n for n in sp[0][1] if "layernorm" in n]
    assert norms and any(sp[0][1][n].abs().sum() > 0 for n in norms)
