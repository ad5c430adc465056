"""Atomic, resharding checkpoints in megatron's torch_dist format.

Layout of a run directory:
    run/step_00000010/   one finished checkpoint (torch_dist shards + common.pt + complete.json)
    run/latest           the name of the newest finished checkpoint, replaced atomically
A save writes into `run/.tmp-step_...`, and only after every rank finished does rank 0 write
`complete.json`, rename the directory into place and then repoint `latest`. A run killed mid-save
therefore leaves `latest` on the previous checkpoint. Loading goes through megatron
dist_checkpointing, so a checkpoint saved at one TP/PP/DP layout loads at any other (the optimizer
state uses the `fully_reshardable` format; per-rank RNG state is restored only at the same layout).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from eureka_megatron.atomic import write_text_atomic
from eureka_megatron.errors import UserError
from eureka_megatron.models.init import iter_leaves
from eureka_megatron.runtime.distributed import broadcast_object
from eureka_megatron.trainer.train_step import TrainableModel

LATEST = "latest"
COMPLETE = "complete.json"
# chained_optim_avoid_prefix: a MoE model at EP > 1 has two optimizers (dense and expert
# parameters; megatron's ChainedOptimizer), at EP 1 one. Their states are saved under the
# parameters' keys without a `chained_{i}.` prefix, so a checkpoint reshards across EP sizes.
_OPT_META = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- validation (runs before any rank starts) ------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (follow `latest`) or a step dir -> a validated step dir, or CheckpointError."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path does not exist: {p}")
    if (p / LATEST).is_file():
        name = (p / LATEST).read_text().strip()
        p = p / name
        if not p.is_dir():
            raise CheckpointError(f"{path}/{LATEST} points to {name}, which does not exist")
    validate_checkpoint(p)
    return p


def check_run_dir(run_dir: str | Path | None, load: str | Path | None) -> None:
    """Refuse to start a fresh run in a directory that already holds another run's checkpoints:
    its saves would interleave with (and `keep_last` would prune) the older ones."""
    if run_dir is None or load is not None:
        return
    latest = Path(run_dir) / LATEST
    if latest.is_file():
        raise CheckpointError(
            f"checkpoint.dir {run_dir} already holds checkpoints (latest: "
            f"{latest.read_text().strip()}); resume with checkpoint.load={run_dir} or choose "
            "another checkpoint.dir")


def validate_checkpoint(step_dir: Path) -> dict:
    """Check a step dir is whole: marker, metadata, every shard present and long enough."""
    step_dir = Path(step_dir)
    marker = step_dir / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{marker} is missing: {step_dir} is not a finished checkpoint "
                              "(killed mid-save, or not a eureka-megatron checkpoint)")
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{marker} is corrupt: {e}") from None
    meta_file = step_dir / ".metadata"
    if not meta_file.is_file():
        raise CheckpointError(f"{meta_file} is missing")
    try:
        with open(meta_file, "rb") as f:
            meta = pickle.load(f)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means a damaged file
        raise CheckpointError(f"{meta_file} cannot be read: {e}") from None
    needed: dict[str, int] = {}
    for item in (meta.storage_data or {}).values():
        end = item.offset + item.length
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), end)
    for rel, end in sorted(needed.items()):
        shard = step_dir / rel
        if not shard.is_file():
            raise CheckpointError(f"checkpoint shard {shard} is missing")
        size = shard.stat().st_size
        if size < end:
            raise CheckpointError(f"checkpoint shard {shard} is truncated: {size} bytes, "
                                  f"metadata needs {end}")
    if not (step_dir / "common.pt").is_file():
        raise CheckpointError(f"{step_dir / 'common.pt'} is missing")
    return info


# --- save / load (collective: every rank calls) ----------------------------------------------


def _model_sd(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _load_chunks(chunks: list, loaded: dict) -> None:
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=True)


def load_weights(chunks: list, path: str | Path) -> Path:
    """Collective: only the model weights of a torch_dist checkpoint -- `convert hf-to-megatron`'s
    output, a training step or a run directory (its latest step) -- into freshly built `chunks`,
    each rank reading its own shards, at any TP/PP/VPP. Returns the directory read."""
    from megatron.core import dist_checkpointing

    step_dir = resolve_checkpoint(path)
    _load_chunks(chunks, dist_checkpointing.load(_model_sd(chunks), str(step_dir)))
    return step_dir


def _rng_object(state: Any):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(), "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    """The layout a checkpoint was saved at (complete.json); RNG states are restored only at the
    same one. Expert parallelism (EP, and an expert TP other than TP) counts too -- megatron's
    expert RNG stream differs per EP rank -- and appears only when used, so dense checkpoints
    keep their layout record."""
    from megatron.core import parallel_state as ps

    layout = {"tp": ps.get_tensor_model_parallel_world_size(),
              "pp": ps.get_pipeline_model_parallel_world_size(),
              "dp": ps.get_data_parallel_world_size(),
              "vpp": ps.get_virtual_pipeline_model_parallel_world_size()}
    ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    if ep > 1 or etp != layout["tp"]:
        layout.update(ep=ep, etp=etp)
    return layout


def save_checkpoint(run_dir: str | Path, step: int, model: TrainableModel,
                    extra_state: dict | None = None, keep_last: int = 0) -> Path:
    """Save everything needed to resume after `step`; returns the finished step dir."""
    from megatron.core import dist_checkpointing

    run_dir, final, tmp = _paths(run_dir, step)
    state, t0 = _begin_save(run_dir, tmp, step, model, extra_state)
    with _failures_reported(run_dir, tmp, step):
        dist_checkpointing.save(state, str(tmp), content_metadata=_OPT_META)
    torch.distributed.barrier()
    _publish(run_dir, final, tmp, step, keep_last, t0)
    torch.distributed.barrier()
    return final


class CheckpointWriter:
    """A run's checkpoint saves, synchronous or (`async_save`) written in the background.

    `save` is `save_checkpoint` (collective, the same files on disk). With `async_save` it returns
    once the state is planned, `common.pt` written and the shards handed to a writer process:
    megatron's `dist_checkpointing.save(..., async_sharded_save=True)` returns an `AsyncRequest`,
    scheduled on an `AsyncCallsQueue`, and the training goes on while it writes. Publishing --
    complete.json, the rename of `.tmp-step_N` to `step_N`, `latest`, pruning -- is that
    request's last finalize function, which megatron runs on every rank only after every rank's
    writer finished and `.metadata` is written. Until then `latest` names the previous checkpoint
    and `keep_last` deletes nothing; a crash mid-write leaves a `.tmp-` dir the next save removes.

    At most one save is pending: the next `save` finalizes it first (blocking); `poll` (collective
    and cheap, every step) publishes it as soon as every rank's write is done; `finish` waits for
    it (the end of a run, before an HF export). A write that failed in the background raises the
    same one-line CheckpointError as a synchronous save from whichever call finalizes it, and the
    `.tmp-` dir is removed. After an error elsewhere, `abort` (local, no collectives) waits for
    this rank's writer to end and publishes nothing.

    The writer is megatron's `TemporalAsyncCaller` (`AsyncCallsQueue(persistent=False)`): one
    process forked per save. On GPU megatron copies the shards to host memory before the fork; on
    CPU (gloo ranks) it leaves CPU tensors in place and the forked child writes its copy-on-write
    snapshot of them (up to one more copy of the rank's state in host memory while the training
    updates it). The persistent worker does not work on CPU: it is spawned, calls
    `torch.cuda.set_device`, and would be handed the live CPU tensors (shared memory, not a
    snapshot) while the training updates them. The finalize collectives run over gloo through
    the CPU compatibility layer (`runtime.cpu_compat`).
    """

    def __init__(self, async_save: bool = False):
        self.async_save = async_save
        self._queue = None  # megatron's AsyncCallsQueue, made on the first async save
        self._pending: tuple[Path, int, Path] | None = None  # (run_dir, step, tmp) being written

    @property
    def pending_step(self) -> int | None:
        """The step whose save is still being written (not yet published), if any."""
        return self._pending[1] if self._pending else None

    def save(self, run_dir: str | Path, step: int, model: TrainableModel,
             extra_state: dict | None = None, keep_last: int = 0) -> Path:
        """Collective: save `step` (finalizing a pending save first). Returns the step dir, which
        exists once the save is published (at once when synchronous)."""
        self.finish()
        if not self.async_save:
            return save_checkpoint(run_dir, step, model, extra_state, keep_last)
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        run_dir, final, tmp = _paths(run_dir, step)
        state, t0 = _begin_save(run_dir, tmp, step, model, extra_state)
        with _failures_reported(run_dir, tmp, step):
            request = dist_checkpointing.save(state, str(tmp), content_metadata=_OPT_META,
                                              async_sharded_save=True)
            request.add_finalize_fn(
                lambda: _publish(run_dir, final, tmp, step, keep_last, t0, async_save=True))
            if self._queue is None:
                self._queue = AsyncCallsQueue(persistent=False)
            self._queue.schedule_async_request(request)
        self._pending = (run_dir, step, tmp)
        return final

    def poll(self) -> int | None:
        """Collective, non-blocking: publish the pending save if every rank's write is done;
        returns the step published now, if any."""
        return self._finalize(blocking=False)

    def finish(self) -> int | None:
        """Collective: wait for the pending save and publish it; returns its step, if any."""
        return self._finalize(blocking=True)

    def abort(self) -> None:
        """Local (no collectives; for error paths): wait until this rank's writer process has
        ended, publish nothing. The pending step's `.tmp-` dir stays until the next save."""
        if self._queue is not None:
            for call in self._queue.async_calls:
                call.async_caller.close()  # joins the forked writer
            self._queue.async_calls.clear()
        self._pending = None

    def _finalize(self, blocking: bool) -> int | None:
        if self._pending is None:
            return None
        run_dir, step, tmp = self._pending
        self._pending = None  # a failed write is not pending any more
        with _failures_reported(run_dir, tmp, step):
            done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        if not done:
            self._pending = (run_dir, step, tmp)
            return None
        return step


@contextmanager
def _failures_reported(run_dir: Path, tmp: Path, step: int) -> Iterator[None]:
    """A failed checkpoint write, whatever its type, becomes the one-line CheckpointError (and
    `tmp` is removed). A failed shard write arrives as torch's CheckpointException -- a
    BaseException, raised on every rank alike -- carrying each failed rank's error."""
    from megatron.core.dist_checkpointing.strategies.state_dict_saver import CheckpointException

    try:
        yield
    except CheckpointException as e:
        _save_failed(run_dir, tmp, step, e, _failure_detail(e))
    except Exception as e:  # noqa: BLE001 -- a full disk shows up as many error types
        _save_failed(run_dir, tmp, step, e)


def _failure_detail(e) -> str:
    """The first failed rank's exception of megatron's CheckpointException, as one line: rank 0
    (the coordinator) holds them all; it sends its line to every rank."""
    line = None
    for rank, (exc, _trace) in sorted(getattr(e, "failures", {}).items()):
        cause = exc.__cause__ or exc
        text = (str(cause).strip().splitlines() or [repr(cause)])[0]
        line = f"rank {rank}: {type(cause).__name__}: {text}"
        break
    return broadcast_object(line) or "the background write failed"


def _paths(run_dir: str | Path, step: int) -> tuple[Path, Path, Path]:
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    return run_dir, final, run_dir / f".tmp-{final.name}"


def _begin_save(run_dir: Path, tmp: Path, step: int, model: TrainableModel,
                extra_state: dict | None) -> tuple[dict, float]:
    """Collective: an empty `tmp` (half-written saves of a killed run removed), the sharded state
    to write, and the free-space check; returns (state, start time)."""
    if torch.distributed.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".tmp-step_*"):  # half-written saves of a killed run
            shutil.rmtree(stale)
        tmp.mkdir()
    torch.distributed.barrier()
    t0 = time.perf_counter()
    model.gather_params()
    state = _model_sd(model.unwrapped)
    for opt in _inner_optimizers(model.optimizer):
        # Nothing trained yet (e.g. an RL run whose first batches were all filtered out): torch
        # Adam has no state to save. A zero-gradient step creates it and leaves the weights as is.
        inner = getattr(opt, "optimizer", None)
        if inner is not None and not inner.state and hasattr(opt, "_init_optimizer_states_with_dummy_values"):
            opt._init_optimizer_states_with_dummy_values()
    state["optimizer"] = _optimizer_sd(model, state)
    state["rng_state"] = _rng_object(_rng_state())
    state["scheduler"] = model.scheduler.state_dict()
    state["step"] = step
    state["extra_state"] = extra_state or {}
    _check_space(run_dir, step, _bytes_to_write(state))
    return state, t0


def _save_failed(run_dir: Path, tmp: Path, step: int, e: BaseException, detail: str | None = None):
    """Raise the one-line CheckpointError of a failed write (rank 0 removes `tmp` first)."""
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if detail is None:
        detail = f"{type(e).__name__}: {(str(e).strip().splitlines() or [repr(e)])[0]}"
    raise CheckpointError(f"saving step {step} to {run_dir} failed ({detail}); "
                          f"{_space(run_dir)}; {_remaining(run_dir)}") from e


def _publish(run_dir: Path, final: Path, tmp: Path, step: int, keep_last: int, t0: float,
             **info) -> None:
    """Rank 0, once every rank's shards are written: mark `tmp` complete, rename it into place,
    repoint `latest`, prune."""
    if torch.distributed.get_rank() != 0:
        return
    info = {"step": step, "layout": _layout(), "saved_at": time.time(),
            "seconds": round(time.perf_counter() - t0, 3), **info}
    write_text_atomic(tmp / COMPLETE, json.dumps(info, indent=1))
    if final.exists():  # a re-save of the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(run_dir / LATEST, final.name)
    if keep_last > 0:
        _prune(run_dir, keep_last)


def _bytes_to_write(state: dict) -> int:
    """Collective: the bytes every rank's shards of `state` take (main replicas; what a save
    writes, before the small metadata)."""
    from megatron.core.dist_checkpointing.mapping import (ShardedTensor, ShardedTensorFactory,
                                                          is_main_replica)

    mine = 0
    for leaf in iter_leaves(state):
        if isinstance(leaf, ShardedTensor) and is_main_replica(leaf.replica_id):
            mine += leaf.data.numel() * leaf.data.element_size() if leaf.data is not None else 0
        elif isinstance(leaf, ShardedTensorFactory) and is_main_replica(leaf.replica_id):
            mine += leaf.data.numel() * leaf.data.element_size()
    total = torch.tensor([mine], dtype=torch.float64)
    torch.distributed.all_reduce(total)
    return int(total.item())


def _check_space(run_dir: Path, step: int, need: int) -> None:
    """Refuse a save the filesystem cannot hold, before writing anything (rank 0 decides)."""
    free = shutil.disk_usage(run_dir).free if torch.distributed.get_rank() == 0 else 0
    flag = torch.tensor([free], dtype=torch.float64)
    torch.distributed.broadcast(flag, src=0)
    free = int(flag.item())
    need = int(need * 1.02) + (4 << 20)  # metadata, pickled objects, the filesystem's blocks
    if need > free:
        if torch.distributed.get_rank() == 0:
            shutil.rmtree(run_dir / f".tmp-{step_dir_name(step)}", ignore_errors=True)
        raise CheckpointError(f"cannot save step {step} to {run_dir}: it needs about {_gb(need)}, "
                              f"{_gb(free)} free there; {_remaining(run_dir)}")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _space(run_dir: Path) -> str:
    return f"{_gb(shutil.disk_usage(run_dir).free)} free there"


def _remaining(run_dir: Path) -> str:
    latest = run_dir / LATEST
    if latest.is_file():
        return f"the newest complete checkpoint, {run_dir / latest.read_text().strip()}, is intact"
    return "no complete checkpoint exists yet"


def load_checkpoint(path: str | Path, model: TrainableModel, load_optimizer: bool = True) -> tuple[int, dict]:
    """Load a checkpoint (any layout) into `model`; returns (step, extra_state)."""
    from megatron.core import dist_checkpointing

    step_dir = resolve_checkpoint(path)
    info = json.loads((step_dir / COMPLETE).read_text())
    model.gather_params()  # no all-gather still in flight to land on the loaded weights
    state = _model_sd(model.unwrapped)
    if load_optimizer:
        for opt in _inner_optimizers(model.optimizer):
            # torch Adam creates its state lazily; the load state dict needs it to exist.
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                opt._init_optimizer_states_with_dummy_values()
        state["optimizer"] = _optimizer_sd(model, state, is_loading=True)
    same_layout = info.get("layout") == _layout()
    if same_layout:
        state["rng_state"] = _rng_object(None)
    loaded = dist_checkpointing.load(state, str(step_dir))
    _load_chunks(model.unwrapped, loaded)
    if load_optimizer:
        model.optimizer.load_state_dict(_fit_chain(loaded["optimizer"], model.optimizer))
        model.scheduler.num_steps = 0  # load_state_dict *adds* the saved step count
        model.scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return int(loaded["step"]), loaded.get("extra_state", {})


def _optimizer_sd(model: TrainableModel, model_state: dict, is_loading: bool = False) -> dict:
    """The optimizer's sharded state (fully reshardable: one tensor per parameter and state).

    megatron-core 0.16 cuts each parameter's state out of a DP-gathered tensor that leaves out
    the padding at the end of every gradient bucket, at the parameter's offset in the padded
    buffer: past the first bucket every parameter got its neighbour's state, shifted (fixed
    upstream after 0.16, Megatron-LM PR #5077). One bucket hides it; `overlap_grad_reduce`
    splits the buffer into many. The offsets are rebased for the call."""
    saved = []
    for opt in _inner_optimizers(model.optimizer):
        for buffer in getattr(opt, "buffers", []):
            if any(b is buffer for b, _ in saved):
                continue
            saved.append((buffer, buffer.param_index_map))
            stripped, before = 0, {}
            for bucket in buffer.buckets:
                before[bucket.bucket_id] = stripped
                stripped += bucket.grad_data.numel() - bucket.numel_unpadded
            buffer.param_index_map = {p: (start - before[b], end - before[b], b)
                                      for p, (start, end, b) in buffer.param_index_map.items()}
    try:
        return model.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                  metadata=_OPT_META)
    finally:
        for buffer, index in saved:
            buffer.param_index_map = index


_GROUP_KEYS = ("wd_mult", "lr_mult", "is_decoupled_lr")  # megatron's group identity, less EP


def _fit_chain(loaded: dict, optimizer) -> dict:
    """The loaded optimizer state in the shape of `optimizer`'s chain. A MoE model has one
    optimizer at EP 1 and two at EP > 1 (dense, expert parameters: megatron's ChainedOptimizer);
    the parameter states reshard by key (`chained_optim_avoid_prefix`), but the common part --
    each optimizer's param_groups (lr, betas, step, ...) -- is stored per optimizer of the saving
    chain. Across EP sizes each current group takes the saved group of the same lr/wd multipliers,
    with its own `is_expert_parallel`. Same chain length: `loaded` unchanged."""
    inner = _inner_optimizers(optimizer)
    ints = sorted(k for k in loaded if isinstance(k, int) and "optimizer" in loaded[k])
    saved = [loaded[k] for k in ints] if ints else [loaded]
    if len(saved) == len(inner):
        return loaded
    pool = [g for c in saved for g in c["optimizer"]["param_groups"]]

    def group(current: dict) -> dict:
        key = tuple(current.get(k) for k in _GROUP_KEYS)
        match = next((g for g in pool if tuple(g.get(k) for k in _GROUP_KEYS) == key), None)
        if match is None:
            raise CheckpointError(f"the checkpoint's optimizer has no parameter group like "
                                  f"{dict(zip(_GROUP_KEYS, key))} (a different optimizer setup)")
        return {**match, "is_expert_parallel": current.get("is_expert_parallel", False)}

    common = {k: v for k, v in saved[0].items() if k != "param_state"}
    fitted = []
    for i, opt in enumerate(inner):
        param_state = (loaded[i] if len(inner) > 1 else loaded)["param_state"]
        groups = [group(g) for g in opt.optimizer.param_groups]
        fitted.append({**common, "optimizer": {**common["optimizer"], "param_groups": groups},
                       "param_state": param_state})
    return dict(enumerate(fitted)) if len(inner) > 1 else fitted[0]


def _inner_optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _prune(run_dir: Path, keep_last: int) -> None:
    done = sorted(p for p in run_dir.glob("step_*") if (p / COMPLETE).is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
