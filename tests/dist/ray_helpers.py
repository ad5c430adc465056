"""What Ray actors of tests/dist/test_ray_launch.py import by name: rank functions and engine
factories. Kept light (torch imported inside functions): every actor imports this module, and
on a busy 2-core box importing the test module's dependencies per actor costs seconds."""
from __future__ import annotations

import os
import time


# --- rank functions ----------------------------------------------------------------------------

def allreduce_rank(x):
    import torch

    from eureka_megatron.config import ParallelConfig
    from eureka_megatron.runtime.distributed import init_distributed

    init_distributed(ParallelConfig(tensor_parallel=2, nproc=2))
    rank = int(os.environ["RANK"])
    t = torch.tensor([float(rank + x)])
    torch.distributed.all_reduce(t)
    env = {k: os.environ[k] for k in ("LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                      "EUREKA_TEST")}
    return rank, t.item(), env, torch.get_num_threads()


def fail_on_rank1():
    if os.environ["RANK"] == "1":
        raise ValueError("bad shard on rank one")
    time.sleep(60)  # would wait forever in a collective; the launcher must not wait for it


def die_on_rank0():
    if os.environ["RANK"] == "0":
        os._exit(7)
    time.sleep(60)


def where_am_i(engines=()):
    """Where Ray put this rank; `engines` (RemoteEngines handed to the ranks) answer from here."""
    import ray

    from eureka_megatron.runtime.placement import current_placement

    layout, pg = current_placement()
    return {"rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]),
            "visible": os.environ["CUDA_VISIBLE_DEVICES"], "ray_gpus": [str(i) for i in ray.get_gpu_ids()],
            "engines_in_layout": len(layout.engine_bundles), "has_pg": pg is not None,
            "engine_pids": [e.node_info()["pid"] for e in engines]}


# --- engine factories --------------------------------------------------------------------------

def tiny_hf_engine(seed: int = 0, family: str = "qwen2"):
    """HFEngine around tests.rollout_fixtures' tiny random model of `family` (one torch thread,
    as in the driver, so the two compute bit-identical log-probs)."""
    import torch

    from eureka_megatron.rollout.hf_engine import HFEngine
    from tests import rollout_fixtures as F

    torch.set_num_threads(1)
    return HFEngine(F.tiny_model(family, seed), F.tiny_tokenizer(), eos_token_ids=[F.EOS])


class ProbeEngine:
    """No model: reports where it runs. For placement tests, where only the GPUs matter."""
    weight_layout = "none"

    def __init__(self, tag: str = ""):
        self.tag, self.weight_version = tag, 0
        self.cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")

    def health(self) -> bool:
        return True

    def restart(self) -> None:
        self.weight_version = None


def sleep_long():
    time.sleep(60)
