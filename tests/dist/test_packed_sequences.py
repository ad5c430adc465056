"""Packed micro-batches compute what padded ones compute (real gloo ranks, fp32).

The same rollout-like sequences -- prompts of different lengths with images of different sizes,
responses of 1 to 9 tokens, rows of one prompt sharing its vision-tower pass -- go through the
RL step twice on the same weights: right-padded rows, and packed rows (sequences end to end with
`cu_seqlens`: megatron's THD path, on CPU a block-diagonal causal mask). Every sequence's
log-probs, the loss and every rank's gradients must agree to 1e-6 relative, for Qwen2.5-VL
(mrope positions restarting per sequence) and InternVL (1-D rope), at TP1, TP2 and PP2.
The packed run must really pack (fewer micro-batches, fewer computed tokens) and really take
the THD path (megatron's `PackedSeqParams` reaches the core attention)."""
import dataclasses

import pytest
import torch

from eureka_megatron.config import AlgoConfig, OptimConfig, ParallelConfig
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.batches import Sequence

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
BUDGET = 64  # tokens per micro-batch: several micro-batches, several sequences per packed row


def model_case(name: str):
    from eureka_megatron.models.registry import family_named

    if name == "qwen2_5_vl":
        from tests.dist.test_qwen2_5_vl import our_config
        return family_named("qwen2_5_vl"), dataclasses.replace(our_config(), freeze_vision=False)
    from tests.dist.test_internvl import our_config
    return family_named("internvl"), dataclasses.replace(our_config("qwen2"), freeze_vision=False)


def rollout(name: str, image_token_id: int) -> list[Sequence]:
    """3 prompts x 3 responses; prompt lengths 9-17 tokens, images of 4 to 12 LLM tokens."""
    gen = torch.Generator().manual_seed(0)
    seqs = []
    for g, size in enumerate((1, 2, 3)):
        if name == "qwen2_5_vl":  # (t, h, w) patches; 4 patches per LLM token
            grid = [[1, 4, 4], [1, 4, 8], [1, 8, 6]][g]
            mm = {"pixel_values": torch.randn(grid[1] * grid[2], 1176, generator=gen),
                  "image_grid_thw": torch.tensor([grid])}
            tokens = grid[1] * grid[2] // 4
        else:  # 56-px tiles of 4 LLM tokens
            tiles = [1, 2, 3][g]
            mm = {"pixel_values": torch.randn(tiles, 3, 56, 56, generator=gen)}
            tokens = 4 * tiles
        prompt = [1, 3] + [image_token_id] * tokens + torch.randint(8, 60, (size,), generator=gen).tolist()
        for j in range(3):
            resp = torch.randint(8, 60, (1 + 3 * j + g,), generator=gen).tolist()
            seqs.append(Sequence(prompt, resp, mm, [-1.0] * len(resp), group=g))
    return seqs


def rl_step(name: str, par: ParallelConfig) -> dict:
    """Rank function: per layout (padded, packed): log-probs per sequence (last stage), the
    summed loss and count, the trainable gradients by name, micro-batches and computed tokens,
    and whether THD params reached the attention."""
    from eureka_megatron.models.forward import forward_token_logprobs
    from eureka_megatron.models.init import layout_invariant_init
    from eureka_megatron.models.packed_attention import PackedDotProductAttention
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.batches import micro_batches
    from eureka_megatron.trainer.policy_forward import policy_forward
    from eureka_megatron.trainer.train_step import run_forward_backward, wrap_for_training

    thd = [0]
    attend = PackedDotProductAttention.forward

    def counted(self, *args, packed_seq_params=None, **kwargs):
        thd[0] += packed_seq_params is not None
        return attend(self, *args, packed_seq_params=packed_seq_params, **kwargs)

    PackedDotProductAttention.forward = counted
    init_distributed(par, seed=1)
    fam, cfg = model_case(name)
    chunks = fam.build_chunks(cfg, par)  # biases zero, norms one: the same at every layout
    layout_invariant_init(chunks, seed=3, std=0.1)
    chunks[0].config.variable_seq_lengths = True  # as the actor: micro-batch shapes differ
    model = wrap_for_training(chunks, OptimConfig(), bf16=False, decay_steps=10)
    vocab = cfg.text.vocab_size
    seqs = rollout(name, cfg.image_token_id)
    advantages = torch.linspace(-1.5, 2.0, len(seqs))
    loss = policy_forward(AlgoConfig(kl_coef=0.0), vocab, call=lambda c, mb: fam.call(cfg, c, mb))
    out = {}
    for pack in (False, True):
        thd[0] = 0
        mbs = micro_batches(seqs, BUDGET, 0, lambda x: fam.prepare(cfg, x), cfg.image_token_id,
                            pack=pack)
        for mb in mbs:
            mb["advantages"] = advantages[mb["sequences"]]
        lps = forward_token_logprobs(model.chunks, mbs, lambda c, mb: fam.call(cfg, c, mb), vocab)
        per_seq = {}
        for lp, mb in zip(lps, mbs):
            for row, i in enumerate(mb["sequences"]):
                per_seq[i] = lp[row][mb["loss_mask"][row] != 0]
        for c in model.chunks:
            c.zero_grad_buffer()
        sums = run_forward_backward(model, mbs, loss)
        grads = {n: p.main_grad.clone() for c in model.chunks for n, p in c.named_parameters()
                 if p.requires_grad}
        out["packed" if pack else "padded"] = dict(
            logprobs=per_seq, loss=sums["loss_sum"], count=sums["count"], grads=grads,
            micro_batches=len(mbs), tokens=sum(mb["input_ids"].numel() for mb in mbs),
            thd_calls=thd[0])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["qwen2_5_vl", "internvl"])
def test_packed_equals_padded(name, layout):
    tp, pp = LAYOUTS[layout]
    par = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, nproc=tp * pp)
    ranks = launch(rl_step, tp * pp, name, par)
    for r in ranks:
        padded, packed = r["padded"], r["packed"]
        assert packed["micro_batches"] <= padded["micro_batches"]
        assert packed["tokens"] < padded["tokens"]
        assert padded["thd_calls"] == 0
        torch.testing.assert_close(packed["loss"], padded["loss"], rtol=1e-6, atol=0)
        assert packed["count"] == padded["count"] > 0
        assert packed["grads"].keys() == padded["grads"].keys()
        for n, g in padded["grads"].items():
            diff = float((packed["grads"][n] - g).norm())
            assert diff <= 1e-6 * float(g.norm()) + 1e-12, (n, diff, float(g.norm()))
        if padded["logprobs"]:  # every rank gets them (broadcast over PP)
            assert packed["logprobs"].keys() == padded["logprobs"].keys()
            for i, lp in padded["logprobs"].items():
                torch.testing.assert_close(packed["logprobs"][i], lp, rtol=1e-6, atol=1e-6)
    assert any(r["packed"]["thd_calls"] > 0 for r in ranks)
    vision = [n for n in ranks[0]["padded"]["grads"] if "vision" in n]
    assert vision and any(ranks[0]["padded"]["grads"][n].abs().sum() > 0 for n in vision)
