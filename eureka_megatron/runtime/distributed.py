"""torch.distributed and megatron parallel_state bring-up (NCCL with CUDA, gloo without)."""
from __future__ import annotations

import datetime
import os
import random
from typing import TYPE_CHECKING

import numpy as np
import torch

from eureka_megatron.runtime import cpu_compat

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(par: ParallelConfig, seed: int = 1234, timeout_minutes: int = 10) -> None:
    """Join the process group from torchrun-style env vars, then build megatron's groups.

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK for the GPU index).
    Safe to call once per process; `shutdown()` undoes it.
    """
    cpu_compat.activate()
    from megatron.core import parallel_state, tensor_parallel

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != par.nproc:
        raise RuntimeError(f"WORLD_SIZE={world} but the layout expects {par.describe()}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend=backend(), rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        expert_model_parallel_size=par.expert_parallel,
        expert_tensor_parallel_size=par.etp,
        distributed_timeout_minutes=timeout_minutes,
    )
    if par.threads:
        torch.set_num_threads(par.threads)
    seed_everything(seed)
    # Megatron's TP RNG tracker: same seed across DP, distinct per TP/PP rank for dropout.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (pickled; for small driver-side state)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank (the agreement after a collective
    operation that may have failed on some ranks only)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def shutdown() -> None:
    """A rank's teardown once its result is made (the launcher's and the Ray ranks'): leave
    megatron's parallel state and the process group. A no-op without a group; never raises, so a
    failing teardown cannot hide the result or the error it follows."""
    if not torch.distributed.is_initialized():
        return
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 -- teardown after the result was sent
        pass
