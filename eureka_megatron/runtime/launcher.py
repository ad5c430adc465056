"""Rank launcher: run a function on N ranks, under torchrun or by spawning them on this machine.

Under torchrun (RANK/WORLD_SIZE set) the current process is one rank and `launch` just calls the
function. Otherwise it spawns `nproc` processes with torchrun-style env vars on a free loopback
port, returns every rank's result in rank order, and turns a failure on any rank into one
exception carrying that rank's traceback -- the other ranks are killed at once instead of
hanging in a collective. Results travel as `torch.save` bytes, so tensors are fine.
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
import traceback
from typing import Any, Callable

import torch

from eureka_megatron.errors import UserError
from eureka_megatron.runtime.distributed import shutdown
from eureka_megatron.runtime.errors import RankError, RankUserError
from eureka_megatron.runtime.ports import free_port


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def _exit_with_parent(parent: int) -> None:
    """A rank outlives nothing: if the launching process dies (SIGTERM, SIGKILL, a crash) before
    it could stop its ranks, they exit instead of training on as orphans -- with their process
    group, so what a rank started (a checkpoint writer) goes too."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        if os.getpgrp() == os.getpid():  # the rank leads its own group (set before this thread)
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _rank_main(fn, args, kwargs, rank, world, port, threads, results, parent=None) -> None:
    os.setpgrp()  # the launcher ends the rank with everything it started (checkpoint writers)
    if parent is not None:
        _exit_with_parent(parent)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    if threads:
        torch.set_num_threads(threads)
    try:
        out = fn(*args, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)
        results.put((rank, "ok", buf.getvalue()))
    except UserError as e:
        results.put((rank, "user", f"{e}"))
    except BaseException:  # noqa: BLE001 -- every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        shutdown()


def launch(fn: Callable[..., Any], nproc: int, *args, timeout: float = 900.0,
           threads_per_rank: int | None = None, **kwargs) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `nproc` ranks and return the per-rank results.

    `fn` must be importable by name (a module-level function) since ranks are spawned.
    Threads per rank default to (CPU cores // nproc), at least 1, so ranks do not oversubscribe.
    """
    if under_torchrun():
        return [fn(*args, **kwargs)]
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, args, kwargs, r, nproc, port, threads, results, os.getpid()),
                    name=f"rank{r}", daemon=False)
        for r in range(nproc)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < nproc:
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue_mod.Empty:
                for r, p in enumerate(procs):
                    if r not in out and p.exitcode is not None:
                        # Give a just-sent result a moment to arrive before blaming the rank.
                        try:
                            rank, status, payload = results.get(timeout=2.0)
                            break
                        except queue_mod.Empty:
                            raise RankError(f"rank {r} died with exit code {p.exitcode} "
                                            "before returning a result") from None
                else:
                    if time.monotonic() > deadline:
                        missing = [r for r in range(nproc) if r not in out]
                        raise TimeoutError(f"ranks {missing} still running after {timeout:.0f}s")
                    continue
            if status == "error":
                raise RankError(_failures({rank: payload}, results, nproc - len(out) - 1))
            if status == "user":
                raise RankUserError(f"rank {rank}: {payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            _kill_group(p)
        results.close()
    return [out[r] for r in range(nproc)]


FAILURE_GRACE_S = 3.0  # how long a failure waits for the other ranks' own failures


def _failures(failed: dict[int, str], results, waiting: int) -> str:
    """Every rank's traceback that arrives within FAILURE_GRACE_S of the first: a collective
    failure often surfaces first on a rank that only saw it ("failed elsewhere"), while the
    cause is in another rank's traceback."""
    deadline = time.monotonic() + FAILURE_GRACE_S
    while len(failed) < waiting + 1 and time.monotonic() < deadline:
        try:
            rank, status, payload = results.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue_mod.Empty:
            break
        if status != "ok":
            failed[rank] = payload
    return "\n".join(f"rank {r} failed:\n{failed[r]}" for r in sorted(failed))


def _kill_group(p) -> None:
    """End rank `p` and every process it started (its process group), whether it returned,
    failed or hangs: nothing it spawned outlives the launch holding memory or a GPU."""
    if p.pid is None:
        return
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # no group yet: still starting up
        pass
    if p.is_alive():
        p.kill()
    p.join(5)
