"""`checkpoint.async_save` on 2 gloo ranks (DP2, distributed optimizer): megatron's async
dist-checkpoint save through `CheckpointWriter`.

- A save written in the background (while the next step trains) loads to exactly the model,
  optimizer and scheduler state a synchronous save of the same step loads to.
- While it is being written, `latest` names the previous checkpoint and the step dir does not
  exist under its final name; `finish` publishes it.
- A write that fails in the background raises the sync path's one-line CheckpointError at
  finalize, removes the `.tmp-` dir and keeps `latest`; an aborted save (an error elsewhere)
  ends its writer and publishes nothing, and the next save clears what it left.
(The train-lm resume with async saves is `test_megatron_lm.py::test_resume_same_layout`.)
"""
import functools
import time
from pathlib import Path

import torch

from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer import checkpoint as ckpt
from tests.helpers import tiny_config


def _train(model, cfg, step):
    from eureka_megatron.data.token_patterns import pattern_batch, split_batch
    from eureka_megatron.trainer.train_step import lm_forward, train_step
    from megatron.core import parallel_state as ps

    batch = pattern_batch(cfg.train.seed, step, cfg.train.global_batch_size, cfg.train.seq_length,
                          cfg.model.vocab_size)
    split = split_batch(batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                        cfg.train.micro_batch_size)
    train_step(model, split, lm_forward(cfg.model.vocab_size))


def _snapshot(model) -> dict:
    """Every tensor a resume depends on: weights, main params, Adam moments, the scheduler."""
    out = {}
    for i, chunk in enumerate(model.unwrapped):
        for k, v in chunk.state_dict().items():
            if torch.is_tensor(v):
                out[f"model{i}.{k}"] = v.detach().clone()
    for j, opt in enumerate(ckpt._inner_optimizers(model.optimizer)):
        inner = opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for n, p in enumerate(group["params"]):
                out[f"opt{j}.{g}.{n}.param"] = p.detach().clone()
                for k, v in inner.state.get(p, {}).items():
                    out[f"opt{j}.{g}.{n}.{k}"] = v.clone() if torch.is_tensor(v) else v
    out["scheduler"] = model.scheduler.state_dict()
    return out


def _start(nproc_cfg):
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.lm_run import build_trainable

    init_distributed(nproc_cfg.parallel, seed=nproc_cfg.train.seed)
    return build_trainable(nproc_cfg)


def _gate_writes(gate: Path | None = None, fail_on_rank: int | None = None):
    """Make this rank's background shard writes wait for `gate` to exist, or fail as on a full
    disk (on `fail_on_rank` only). Patched before the writer forks, so the writer inherits it.
    Returns the function that undoes it."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    orig, rank = filesystem_async._write_item, torch.distributed.get_rank()

    @functools.wraps(orig)  # megatron inspects its signature
    def write_item(*args, **kwargs):
        if fail_on_rank == rank:
            raise OSError(28, "No space left on device")
        while gate is not None and not gate.exists():
            time.sleep(0.02)
        return orig(*args, **kwargs)

    filesystem_async._write_item = write_item
    return lambda: setattr(filesystem_async, "_write_item", orig)


def _async_vs_sync(cfg, root: Path) -> dict:
    """Rank function: step 1 saved async (published); step 2 saved sync to sync/ and async to
    async/ with the shard writes held; step 3 trains while they are held; then finish, and both
    step-2 checkpoints are loaded back."""
    model = _start(cfg)
    sync_dir, async_dir, gate = root / "sync", root / "async", root / "gate"
    writer = ckpt.CheckpointWriter(async_save=True)
    _train(model, cfg, 1)
    writer.save(async_dir, 1, model, {"data_step": 1})
    assert writer.pending_step == 1
    assert writer.finish() == 1
    _train(model, cfg, 2)
    ckpt.save_checkpoint(sync_dir, 2, model, {"data_step": 2})
    _gate_writes(gate)
    t0 = time.perf_counter()
    final = writer.save(async_dir, 2, model, {"data_step": 2})
    out = {"save_returned_s": time.perf_counter() - t0, "final": final}
    pending = {"latest": (async_dir / ckpt.LATEST).read_text(), "final_exists": final.exists(),
               "tmp_exists": (async_dir / ".tmp-step_00000002").is_dir(),
               "step1_exists": (async_dir / "step_00000001").is_dir()}
    _train(model, cfg, 3)  # the live state moves on while the shards are written
    pending["poll"] = writer.poll()
    pending["pending_step"] = writer.pending_step
    out["pending"] = pending
    trained_on = _snapshot(model)
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        gate.touch()
    out["finished"] = writer.finish()
    out["after"] = {"latest": (async_dir / ckpt.LATEST).read_text(), "final_exists": final.exists(),
                    "tmp_exists": (async_dir / ".tmp-step_00000002").exists(),
                    "pending_step": writer.pending_step}
    ckpt.resolve_checkpoint(async_dir)  # validates the published checkpoint
    out["step_sync"], extra_sync = ckpt.load_checkpoint(sync_dir, model)
    out["sync"] = _snapshot(model)
    out["step_async"], extra_async = ckpt.load_checkpoint(async_dir, model)
    out["async"] = _snapshot(model)
    out["extra"] = (extra_sync, extra_async)
    out["moved"] = any(not torch.equal(trained_on[k], out["sync"][k])
                       for k in trained_on if torch.is_tensor(trained_on[k]))
    return out


def test_async_save_is_the_sync_checkpoint_and_published_only_when_written(tmp_path):
    results = launch(_async_vs_sync, 2, tiny_config(nproc=2), tmp_path, timeout=300)
    for rank, r in enumerate(results):
        # while held: the previous checkpoint stays `latest`, the new one is only a .tmp- dir
        assert r["pending"] == {"latest": "step_00000001", "final_exists": False, "tmp_exists": True,
                                "step1_exists": True, "poll": None, "pending_step": 2}, rank
        assert r["finished"] == 2
        assert r["after"] == {"latest": "step_00000002", "final_exists": True, "tmp_exists": False,
                              "pending_step": None}
        assert r["step_sync"] == r["step_async"] == 2
        assert r["extra"] == ({"data_step": 2}, {"data_step": 2})
        assert r["moved"]  # step 3 changed the live state the async save had to snapshot
        sync, asyn = r["sync"], r["async"]
        assert sync.keys() == asyn.keys() and len(sync) > 10
        for k in sync:
            if torch.is_tensor(sync[k]):
                assert sync[k].dtype == asyn[k].dtype and torch.equal(sync[k], asyn[k]), (rank, k)
            else:
                assert sync[k] == asyn[k], (rank, k)
    assert (tmp_path / "async" / "step_00000001" / ckpt.COMPLETE).is_file()  # keep_last=0


def _failed_background_write(cfg, run_dir: Path) -> dict:
    """Rank function: step 1 saved async; step 2's background write fails on rank 1 (a full
    disk): finish() must raise the one-line CheckpointError on every rank. Then step 3's save is
    aborted (as on an error elsewhere), and step 4 is saved over its leftovers."""
    model = _start(cfg)
    writer = ckpt.CheckpointWriter(async_save=True)
    _train(model, cfg, 1)
    writer.save(run_dir, 1, model, keep_last=1)
    _train(model, cfg, 2)
    restore = _gate_writes(fail_on_rank=1)
    writer.save(run_dir, 2, model, keep_last=1)  # finalizes step 1 first
    try:
        writer.finish()
    except ckpt.CheckpointError as e:
        message = str(e)
    else:
        message = None
    torch.distributed.barrier()
    out = {"message": message, "pending_step": writer.pending_step,
           "latest": (run_dir / ckpt.LATEST).read_text(),
           "tmp": sorted(p.name for p in run_dir.glob(".tmp-*"))}
    restore()
    _train(model, cfg, 3)
    writer.save(run_dir, 3, model, keep_last=1)
    procs = [c.async_caller.process for c in writer._queue.async_calls]
    writer.abort()  # local: waits for this rank's writer, publishes nothing
    torch.distributed.barrier()
    out["aborted"] = {"writers": len(procs), "alive": [p.is_alive() for p in procs],
                      "pending_step": writer.pending_step,
                      "latest": (run_dir / ckpt.LATEST).read_text(),
                      "tmp": sorted(p.name for p in run_dir.glob(".tmp-*"))}
    torch.distributed.barrier()
    writer.save(run_dir, 4, model, keep_last=1)
    writer.finish()
    out["after"] = {"latest": (run_dir / ckpt.LATEST).read_text(),
                    "dirs": sorted(p.name for p in run_dir.iterdir() if p.is_dir())}
    return out


def test_a_failed_background_write_is_one_line_and_loses_nothing(tmp_path):
    results = launch(_failed_background_write, 2, tiny_config(nproc=2), tmp_path, timeout=300)
    intact = f"the newest complete checkpoint, {tmp_path / 'step_00000001'}, is intact"
    for r in results:
        m = r["message"]
        assert m is not None and "\n" not in m
        assert m.startswith(f"saving step 2 to {tmp_path} failed (rank 1: ")
        assert "No space left on device" in m and m.endswith(" free there; " + intact)
        assert r["pending_step"] is None and r["latest"] == "step_00000001" and r["tmp"] == []
        assert r["aborted"] == {"writers": 1, "alive": [False], "pending_step": None,
                                "latest": "step_00000001", "tmp": [".tmp-step_00000003"]}
        assert r["after"] == {"latest": "step_00000004", "dirs": ["step_00000004"]}  # keep_last=1
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step_00000004"


def _failed_sync_write(cfg, run_dir: Path) -> dict:
    """Rank function: step 1 saved; step 2's shard write fails on rank 1 (a full disk) in a
    synchronous save: megatron raises torch's CheckpointException (a BaseException)."""
    model = _start(cfg)
    _train(model, cfg, 1)
    ckpt.save_checkpoint(run_dir, 1, model)
    restore = _gate_writes(fail_on_rank=1)
    try:
        ckpt.save_checkpoint(run_dir, 2, model)
    except ckpt.CheckpointError as e:
        message = str(e)
    else:
        message = None
    restore()
    torch.distributed.barrier()
    return {"message": message, "latest": (run_dir / ckpt.LATEST).read_text(),
            "tmp": sorted(p.name for p in run_dir.glob(".tmp-*"))}


def test_a_failed_sync_write_is_one_line_too(tmp_path):
    results = launch(_failed_sync_write, 2, tiny_config(nproc=2), tmp_path, timeout=300)
    intact = f"the newest complete checkpoint, {tmp_path / 'step_00000001'}, is intact"
    for r in results:
        m = r["message"]
        assert m is not None and "\n" not in m, m
        assert m.startswith(f"saving step 2 to {tmp_path} failed (rank 1: ")
        assert "No space left on device" in m and m.endswith(" free there; " + intact)
        assert r["latest"] == "step_00000001" and r["tmp"] == []
