"""Micro-batching of rollout sequences: the token budget, and rows of one prompt sharing one
vision-tower pass. Sharing must not change a single log-prob or gradient: compared on the
megatron Qwen2.5-VL (demo model, one rank) against every row carrying its own copy."""
import torch

from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.batches import Sequence, collate, dp_share, token_budget_partition
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint


def test_token_budget_partition():
    assert token_budget_partition([3, 3, 3, 3], 6) == [[0, 1], [2, 3]]
    assert token_budget_partition([2, 5, 1], 10) == [[0, 1], [2]]  # 3 rows x 5 > 10
    assert token_budget_partition([20, 1], 4) == [[0], [1]]  # too long: alone
    assert token_budget_partition([], 8) == []


def test_dp_share_balances_and_covers():
    seqs = [Sequence([1] * n, [2]) for n in (5, 1, 4, 2, 3, 6)]
    shares = [dp_share(seqs, r, 2) for r in range(2)]
    assert sorted(id(s) for sh in shares for s in sh) == sorted(id(s) for s in seqs)
    assert abs(sum(map(len, shares[0])) - sum(map(len, shares[1]))) <= 6


def test_collate_labels_and_image_index():
    img = 9
    mm_a = {"pixel_values": torch.arange(8.).view(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    mm_b = {"pixel_values": -torch.arange(8.).view(4, 2), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    seqs = [Sequence([5, img, 6], [7, 8], mm_a, [-0.1, -0.2]),
            Sequence([5, img, 6], [7], mm_a, [-0.3]),
            Sequence([5, img, 6], [8, 8, 8], mm_b, [-0.4, -0.5, -0.6])]
    out = collate(seqs, pad_id=0, image_token_id=img)
    assert out["labels"][0].tolist() == [-100, -100, 7, 8, -100, -100]
    assert out["loss_mask"][2].tolist() == [0, 0, 1, 1, 1, 0]
    assert out["rollout_logprobs"][0, 2:4].tolist() == [-0.10000000149011612, -0.20000000298023224]
    assert out["pixel_values"].shape == (8, 2)  # two distinct prompts, not three rows
    assert out["image_index"].tolist() == [0, 0, 1]  # one image token per row
    assert out["row_image_grid_thw"].shape == (3, 3)


def rank(cfg):
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.actor import Actor
    from eureka_megatron.trainer.batches import micro_batches

    init_distributed(cfg.parallel, seed=1)
    actor = Actor(cfg, need_reference=False)
    gen = torch.Generator().manual_seed(0)
    img = actor.model_cfg.image_token_id
    prompt = [1, 3] + [img] * 4 + [4, 50, 51]
    seqs = []
    for g in range(3):
        mm = {"pixel_values": torch.randn(16, 1176, generator=gen),
              "image_grid_thw": torch.tensor([[1, 4, 4]])}
        for j in range(4):
            resp = torch.randint(8, 60, (2 + j,), generator=gen).tolist()
            seqs.append(Sequence(prompt, resp, mm, [0.0] * len(resp), group=g))
    out = {}
    for shared in (True, False):
        mbs = micro_batches(seqs, 64, 0, actor.prepare, img if shared else None)
        for mb in mbs:  # advantage j - 1.5 for the response of 2 + j tokens
            mb["advantages"] = mb["loss_mask"].sum(1) - 3.5
        lps = actor.forward_logprobs(mbs)
        for c in actor.model.chunks:
            c.zero_grad_buffer()
        from eureka_megatron.trainer.train_step import run_forward_backward

        run_forward_backward(actor.model, mbs, actor.policy_forward())
        grads = torch.cat([p.main_grad.flatten() for c in actor.model.chunks
                           for p in c.parameters() if p.requires_grad])
        out[shared] = (torch.cat([lp[mb["loss_mask"] != 0] for lp, mb in zip(lps, mbs)]), grads,
                       sum(mb["pixel_values"].shape[0] for mb in mbs))
    return out


def test_shared_vision_pass_changes_nothing(tmp_path):
    hf = write_tiny_checkpoint(tmp_path / "hf", seed=0)
    cfg = demo_config(tmp_path / "out", [f"model.hf={hf}", "warmup.steps=0", "algo.kl_coef=0"])
    out = launch(rank, 1, cfg)[0]
    (lp_s, g_s, pix_s), (lp_c, g_c, pix_c) = out[True], out[False]
    assert pix_s * 4 == pix_c  # each group's image encoded once instead of 4 times
    torch.testing.assert_close(lp_s, lp_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_s, g_c, rtol=1e-4, atol=1e-7)
    assert g_s.abs().sum() > 0
