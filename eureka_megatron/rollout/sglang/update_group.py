"""The trainer's end of SGLang's weight-update process group (disaggregated engines).

SGLang's engine ranks join with `init_custom_process_group` (sglang/srt/utils/common.py):
torch's `tcp://` rendezvous at (master_address, master_port) as rank `rank_offset + tp_rank`,
wrapped in `PrefixStore(group_name)`, then torch's `_new_process_group_helper`. The trainer
(rank 0, the broadcast source) must build the same thing with the same group name, or the
store keys never meet. NCCL on GPUs; gloo for CPU tensors (tests).
"""
from __future__ import annotations

import socket
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from eureka_megatron.runtime.ports import free_port

DEFAULT_GROUP_NAME = "weight_update_group"


def address_facing(url: str) -> str:
    """This host's address as seen from the server at `url` (loopback for a local server)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: picks the route, sends nothing
        return s.getsockname()[0]


class WeightUpdateGroup:
    """Rank 0 of a `world_size` group shared with an engine's TP ranks. Construction blocks
    until every member joined: start the engine's /init_weights_update_group concurrently."""

    def __init__(self, master_address: str, master_port: int, world_size: int, *,
                 group_name: str = DEFAULT_GROUP_NAME, backend: str = "nccl",
                 timeout: float = 600.0):
        if world_size < 2:
            raise ValueError(f"a weight-update group needs the trainer and >= 1 engine rank, "
                             f"got world_size={world_size}")
        self.master_address, self.master_port = master_address, int(master_port)
        self.world_size, self.group_name, self.backend = world_size, group_name, backend
        wait = timedelta(seconds=timeout)
        host = f"[{master_address}]" if ":" in master_address else master_address
        store, _, _ = next(dist.rendezvous(f"tcp://{host}:{self.master_port}", 0, world_size,
                                           timeout=wait))
        store.set_timeout(wait)
        self.group, _ = c10d._new_process_group_helper(
            world_size, 0, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
            group_name=group_name, timeout=wait)
        c10d._world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}

    @staticmethod
    def pick_port(master_address: str) -> int:
        return free_port(master_address)

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Start sending `tensor` to every engine rank (returns the pending work)."""
        return dist.broadcast(tensor, src=0, group=self.group, async_op=True)

    def destroy(self, abort: bool = False) -> None:
        """Leave the group. abort: a broadcast may still be pending (a failed sync): an NCCL
        communicator is aborted first, which ends it (a gloo one ends when the engine's side of
        the group goes)."""
        group, self.group = self.group, None
        if group is None:
            return
        if abort and self.backend == "nccl":
            group.abort()
        dist.destroy_process_group(group)
