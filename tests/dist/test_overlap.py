"""Megatron's communication overlap changes when the DP collectives run, never the numbers.

`optim.overlap_grad_reduce` starts each gradient bucket's reduce-scatter inside the backward pass;
`optim.overlap_param_gather` leaves the all-gather of the updated parameters to the next forward
pass. On real gloo ranks (fp32; CPU's `auto` is off, so both are forced on) the same batches give
the same losses, grad-norms and parameters as with both off, at DP2 with one bucket and with many
(a small `optim.ddp_bucket_size`), and at TP2 x DP2 and PP2 x DP2. Between a step and the next
forward the parameters are stale on every rank (each holds only its own shard's update): a
checkpoint saved then reloads to the right weights and a weight export sends them; the RL
actor's weight sync, HF export and log-prob pass see the updated weights. Megatron's async
collectives are counted, so the test cannot pass with the overlap silently off.
"""
import pytest
import torch
from safetensors.torch import load_file

from eureka_megatron.config import Config
from eureka_megatron.data.token_patterns import pattern_batch, split_batch
from eureka_megatron.models.qwen2.hf import qwen2_mapping
from eureka_megatron.rollout.weight_export import export_hf_weights
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer import checkpoint as ckpt
from eureka_megatron.trainer.batches import Sequence
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint
from eureka_megatron.trainer.lm_run import build_trainable
from eureka_megatron.trainer.train_step import lm_forward, train_step
from tests.helpers import rel_diff, tiny_config

STEPS = 3
SAVE_AT = 2


def _count_overlap() -> dict:
    """Count megatron's asynchronous collectives: gradient reduces already in flight when the
    step's finalize waits for them, and parameter all-gathers dispatched asynchronously."""
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup as G

    counts = {"grad_in_flight": 0, "param_async": 0}
    finish, start = G.finish_grad_sync, G.start_param_sync

    def finish_grad_sync(self, *args, **kwargs):
        counts["grad_in_flight"] += self.grad_reduce_handle is not None
        return finish(self, *args, **kwargs)

    def start_param_sync(self, force_sync=False):
        counts["param_async"] += self.ddp_config.overlap_param_gather and not force_sync
        return start(self, force_sync)

    G.finish_grad_sync, G.start_param_sync = finish_grad_sync, start_param_sync
    return counts


def _params(model) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(model.unwrapped)
            for n, p in c.named_parameters()}


def _export(model, cfg: Config) -> dict[str, torch.Tensor]:
    """The HF tensors a weight sync sends (on rank 0; empty elsewhere)."""
    mapping = qwen2_mapping(cfg.model, "model.", "lm_head.weight")
    return {n: t.clone() for n, t in export_hf_weights(model.unwrapped, mapping, dest="rank0")}


def _step(model, cfg: Config, step: int) -> dict:
    from megatron.core import parallel_state as ps

    batch = pattern_batch(cfg.train.seed, step, cfg.train.global_batch_size, cfg.train.seq_length,
                          cfg.model.vocab_size)
    split = split_batch(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                        cfg.train.micro_batch_size)
    return train_step(model, split, lm_forward(cfg.model.vocab_size))


def overlap_vs_off(off: Config, on: Config, ckpt_dir: str | None) -> dict:
    """Rank function: STEPS steps with the overlap off, then on, the same batches; with a
    `ckpt_dir`, a checkpoint saved after step SAVE_AT and a fresh overlapped model resumed
    from it."""
    counts = _count_overlap()
    init_distributed(off.parallel, seed=off.train.seed)
    out = {}
    model = build_trainable(off)
    out["off"] = [_step(model, off, s) for s in range(1, STEPS + 1)]
    out["off_params"], out["off_export"] = _params(model), _export(model, off)
    assert counts == {"grad_in_flight": 0, "param_async": 0}

    model = build_trainable(on)
    out["buckets"] = len(model.chunks[0].bucket_groups)
    out["on"] = []
    for s in range(1, STEPS + 1):
        out["on"].append(_step(model, on, s))
        if s == SAVE_AT and ckpt_dir:
            ckpt.save_checkpoint(ckpt_dir, s, model, {})
    out["stale"] = _params(model)  # before anything gathered the last step's update
    out["counts"] = dict(counts)
    model.gather_params()  # as Actor.sync_to / export_hf and a checkpoint save do
    out["on_export"], out["on_params"] = _export(model, on), _params(model)
    if not ckpt_dir:
        return out
    model = build_trainable(on)
    step, _ = ckpt.load_checkpoint(ckpt_dir, model)
    out["resumed"] = [_step(model, on, s) for s in range(step + 1, STEPS + 1)]
    model.gather_params()
    out["resumed_params"] = _params(model)
    return out


def _configs(tp: int, pp: int, bucket: int | None) -> tuple[Config, Config]:
    off, on = (tiny_config(tp=tp, pp=pp, nproc=2 * tp * pp, steps=STEPS) for _ in range(2))
    off.optim.overlap_grad_reduce = off.optim.overlap_param_gather = False
    on.optim.overlap_grad_reduce = on.optim.overlap_param_gather = True
    on.optim.ddp_bucket_size = bucket
    return off, on.validate()


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    """Within `tol` of the larger of 1 and the tensor's largest value. Not 1e-6: with several
    buckets each rank's optimizer shard holds other elements, so the grad-norm sums squares in
    another order (1e-7 relative), which scales the clipped gradients, and Adam's division by
    sqrt(v) turns that into up to ~3e-6 on biases with tiny gradients after 3 steps of lr 2e-3
    (a stale shard is off by 1e-3)."""
    return a.keys() == b.keys() and all(
        (a[k] - b[k]).abs().max() <= tol * max(b[k].abs().max(), 1.0) for k in a)


@pytest.mark.parametrize("tp,pp,bucket,resume", [(1, 1, 20_000, True), (1, 2, 20_000, False)],
                         ids=["dp2-buckets-resume", "pp2-dp2"])
def test_overlap_equals_off(tmp_path, tp, pp, bucket, resume):
    off, on = _configs(tp, pp, bucket)
    ranks = launch(overlap_vs_off, off.parallel.nproc, off, on, str(tmp_path) if resume else None)
    for r in ranks:
        for a, b in zip(r["on"], r["off"]):
            for key in ("loss", "grad_norm", "lr"):
                assert rel_diff(a[key], b[key]) < 1e-6, (key, a[key], b[key])
        assert _close(r["on_params"], r["off_params"])
        # the overlap ran: every step after the first found its reduces in flight, and the
        # forward passes' pre-hooks started the param all-gathers; PP stage 0 has many buckets
        assert r["counts"]["grad_in_flight"] >= r["buckets"] * (STEPS - 1)
        assert r["counts"]["param_async"] >= r["buckets"] * (STEPS - 1)
        # ... and left the parameters stale after the step: reading them needs the gather
        assert not _close(r["stale"], r["off_params"])
        if resume:  # from the checkpoint saved mid-run: the same next step and weights
            for a, b in zip(r["resumed"], r["off"][SAVE_AT:]):
                assert rel_diff(a["loss"], b["loss"]) < 1e-6
                assert rel_diff(a["grad_norm"], b["grad_norm"]) < 1e-6
            assert _close(r["resumed_params"], r["off_params"])
    assert ranks[0]["buckets"] > 1
    export = ranks[0]["on_export"]
    assert export and _close(export, ranks[0]["off_export"])


class _Capture:
    """A rollout engine that keeps what a weight sync sends."""

    def __init__(self, layout: str):
        self.weight_layout, self.tensors = layout, {}

    def update_weights(self, buckets, version):
        self.tensors = {n: t.clone() for bucket in buckets for n, t in bucket}


def actor_weights_out(cfg, out_dir: str) -> dict:
    """Rank function: two RL optimizer steps of the demo's Qwen2.5-VL with the overlap, then the
    log-prob pass, the weight sync and the HF export, each straight after a step."""
    from eureka_megatron.trainer.actor import Actor

    counts = _count_overlap()
    init_distributed(cfg.parallel, seed=1)
    actor = Actor(cfg, need_reference=False)
    gen = torch.Generator().manual_seed(0)
    img = actor.model_cfg.image_token_id
    prompt = [1, 3] + [img] * 4 + [4, 50, 51]
    mm = {"pixel_values": torch.randn(16, 1176, generator=gen),
          "image_grid_thw": torch.tensor([[1, 4, 4]])}
    seqs = [Sequence(prompt, torch.randint(8, 60, (2 + j,), generator=gen).tolist(), mm,
                     [0.0] * (2 + j), group=0) for j in range(4)]
    mbs = actor.micro_batches(seqs, 0)
    for mb in mbs:
        mb["advantages"] = mb["loss_mask"].sum(1) - 3.5
    out = {}
    for _ in range(2):
        actor.train_micro_batches(mbs, actor.policy_forward())
    out["pending"] = actor.model.params_pending
    out["lp_hooks"] = actor.forward_logprobs(mbs)  # the forward pre-hooks gather
    actor.model.gather_params()
    out["lp_gathered"] = actor.forward_logprobs(mbs)
    actor.train_micro_batches(mbs, actor.policy_forward())
    engine = _Capture(actor.hf_layout) if torch.distributed.get_rank() == 0 else None
    actor.sync_to(engine, version=3)
    out["synced"], out["synced_truth"] = engine and engine.tensors, _trained_weights(actor)
    actor.train_micro_batches(mbs, actor.policy_forward())
    actor.export_hf(out_dir)
    out["exported_truth"], out["counts"] = _trained_weights(actor), dict(counts)
    return out


def _trained_weights(actor) -> dict[str, torch.Tensor]:
    """The HF tensors of the actor's weights, gathered here (what a sync or export that forgot
    to gather would not have sent)."""
    actor.model.gather_params()
    mapping = actor.family.mapping(actor.model_cfg, actor.hf_layout)
    return {n: t.clone() for n, t in export_hf_weights(actor.model.unwrapped, mapping, dest="rank0")}


def test_rl_actor_weights_out_see_the_step(tmp_path):
    """The actor gathers before its weight sync and HF export (a sync of the pending weights
    would send every rank's stale half), and its log-prob pass gets the gathered weights."""
    hf = write_tiny_checkpoint(tmp_path / "hf", seed=0)
    cfg = demo_config(tmp_path / "run", [
        f"model.hf={hf}", "warmup.steps=0", "algo.kl_coef=0", "parallel.nproc=2",
        "optim.overlap_grad_reduce=true", "optim.overlap_param_gather=true",
        "optim.ddp_bucket_size=50000"])
    ranks = launch(actor_weights_out, 2, cfg, str(tmp_path / "export"))
    for r in ranks:
        assert r["pending"]
        assert r["counts"]["grad_in_flight"] > 0 and r["counts"]["param_async"] > 0
        for a, b in zip(r["lp_hooks"], r["lp_gathered"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    synced, truth = ranks[0]["synced"], ranks[0]["synced_truth"]
    assert synced.keys() == truth.keys() and all(torch.equal(synced[n], truth[n]) for n in truth)
    on_disk, truth = {}, ranks[0]["exported_truth"]
    for f in (tmp_path / "export").glob("*.safetensors"):
        on_disk |= load_file(f)
    assert on_disk.keys() == truth.keys() and all(torch.equal(on_disk[n], truth[n]) for n in truth)
