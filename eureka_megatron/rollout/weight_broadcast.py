"""Disaggregated weight sync: one sender per pipeline stage broadcasts that stage's HF tensors
into a weight-update group it shares with the engine's ranks (slime's per-stage groups,
`update_weight_from_distributed.py`), while the rank that owns the engine client has the engine
receive them.

- Senders: the rank at TP 0 / DP 0 of each stage gets its stage's tensors from the export
  (`dest="stage"`: a TP all-gather, HF names by the same mapping), packs them in buckets -- one
  flat buffer per dtype, the layout of SGLang's flattened_bucket receive -- and broadcasts each
  buffer's bytes into group "eureka-pp{stage}" (itself rank 0, the engine's ranks after it).
- The engine's side, on rank 0: one weight-update session in which the engine receives every
  buffer, stage after stage, with one /update_weights_from_distributed each; the version goes
  with the very last one, so it is committed only when every stage has landed.

Rank 0 drives every stage's requests rather than each sender its own: every rank knows every
bucket's names, dtypes and shapes from the global shapes alone (`weight_export.stage_plan`), so
no per-bucket message passes between ranks; the session, the version and the failure handling
stay in the one client the rollout uses; and the engine loads one update at a time anyway
(SGLang serialises weight updates; slime needs a lock actor to order its senders' requests).

Failure: whoever fails first -- a refused or failed request, a broadcast that errors, a group
that does not form -- raises the sync's abort flag (a key in the job's store). Senders poll it
while they wait on a broadcast or a group: they drop their group (which ends the engine's side
of a pending broadcast) and keep the export going for their TP peers to the end. Then all ranks
agree on the outcome, as `sync_weights` does: on failure the engine is at version None and has
left its groups, and the next sync joins afresh. Groups are otherwise kept between syncs.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from eureka_megatron.models.mapping import Mapping
from eureka_megatron.rollout.bucket_stream import SyncAborted
from eureka_megatron.rollout.buckets import bucket_by_bytes, flatten_bucket
from eureka_megatron.rollout.engine import GroupJoin, ReceiverInfo
from eureka_megatron.rollout.sglang.update_group import WeightUpdateGroup, address_facing
from eureka_megatron.rollout.weight_export import StagePlan, export_hf_weights, stage_plan
from eureka_megatron.runtime.distributed import all_ranks_true, broadcast_object

GROUP_NAME = "eureka-pp{stage}"
ABORT_KEY = "eureka/weight-sync/abort"
POLL_S = 0.0005        # how often a waiting sender looks at its broadcast
ABORT_POLL_S = 0.05    # ... and at the abort flag (a store round trip)


class AbortFlag:
    """A flag any rank (or thread) may raise and every rank can see: a key in the store of the
    default process group, cleared by rank 0 once all ranks have agreed on the sync's outcome."""

    def __init__(self):
        self.store = c10d._get_default_store()

    def set(self) -> None:
        self.store.set(ABORT_KEY, "1")

    def is_set(self) -> bool:
        return self.store.check([ABORT_KEY])

    def clear(self) -> None:
        self.store.delete_key(ABORT_KEY)


@dataclass
class BroadcastResult:
    ok: bool           # the same on every rank
    error: str | None
    bytes: int         # HF tensor bytes the engine was sent, all stages
    tensors: int


def _wait(done: Callable[[], bool], abort: AbortFlag, what: str) -> None:
    """Until `done()`; SyncAborted as soon as the abort flag is seen."""
    checked = 0.0
    while not done():
        now = time.monotonic()
        if now - checked > ABORT_POLL_S:
            if abort.is_set():
                raise SyncAborted(f"{what}: the weight sync failed elsewhere")
            checked = now
        time.sleep(POLL_S)


def stage_requests(plan: StagePlan, bucket_bytes: int) -> list[tuple[str, list]]:
    """Per stage, its group and the metadata of every flat buffer its sender broadcasts: the
    sender's own bucketing, run on meta tensors of the planned shapes."""
    out = []
    for stage, tensors in enumerate(plan.tensors):
        named = ((n, torch.empty(s, dtype=d, device="meta")) for n, s, d in tensors)
        metas = [flat.metadata for bucket in bucket_by_bytes(named, bucket_bytes)
                 for flat in flatten_bucket(bucket)]
        out.append((GROUP_NAME.format(stage=stage), metas))
    return out


class WeightBroadcaster:
    """This rank's part in disaggregated syncs; every rank holds one and calls `sync` together.
    A stage's sender keeps its group between syncs."""

    def __init__(self):
        self.group: WeightUpdateGroup | None = None

    def sync(self, chunks: list[torch.nn.Module], mapping: Mapping, engine, version: int, *,
             bucket_bytes: int) -> BroadcastResult:
        """Collective: the model's weights into `engine` (rank 0's; None elsewhere) as
        `version`, by broadcast from each stage's sender (see the module doc)."""
        abort = AbortFlag()
        plan = stage_plan(chunks, mapping)
        me = dist.get_rank()
        stage = plan.senders.index(me) if me in plan.senders else None
        info: ReceiverInfo = broadcast_object(
            engine.receiver_info() if engine is not None else None)
        names = [GROUP_NAME.format(stage=s) for s in range(len(plan.senders))]
        ready = all_ranks_true((stage is None or self.group is not None)
                               and (engine is None or info.joined.issuperset(names)))
        join, error = None, None
        if not ready:
            self._close()
            if engine is not None:
                engine.leave_weight_groups()
            join = self._endpoints(stage, info, names)
        driver = None
        if engine is not None:
            driver = _Driver(engine, stage_requests(plan, bucket_bytes), version, abort, join)
        try:
            if stage is not None and join is not None:
                self._open(join, stage, info, abort)
        except Exception as e:  # noqa: BLE001 -- agreed on below
            error = f"{type(e).__name__}: {e}"
        error = self._send(chunks, mapping, bucket_bytes, abort, error)
        if driver is not None:
            error = driver.join() or error
        ok = all_ranks_true(error is None)  # every rank is past its last look at the flag
        if not ok:
            self._close()
            if engine is not None:
                engine.leave_weight_groups()
                abort.clear()
            error = _first_cause(error)
        sizes = [torch.Size(s).numel() * d.itemsize for st in plan.tensors for _, s, d in st]
        return BroadcastResult(ok, error, sum(sizes), len(sizes))

    def close(self, engine=None) -> None:
        """Drop this rank's group (and `engine`'s, on the rank that has it)."""
        self._close()
        if engine is not None:
            engine.leave_weight_groups()

    # --- internals ------------------------------------------------------------------------------

    def _endpoints(self, stage: int | None, info: ReceiverInfo, names: list[str]) -> GroupJoin:
        """Collective: every sender offers an address facing the engine and a free port."""
        mine = None
        if stage is not None:
            address = address_facing(info.url)
            mine = (stage, address, WeightUpdateGroup.pick_port(address))
        offers = [None] * dist.get_world_size()
        dist.all_gather_object(offers, mine)
        by_stage = {o[0]: o[1:] for o in offers if o is not None}
        return GroupJoin(tuple((n, *by_stage[s]) for s, n in enumerate(names)),
                         world_size=1 + info.ranks, rank_offset=1, backend=info.backend)

    def _open(self, join: GroupJoin, stage: int, info: ReceiverInfo, abort: AbortFlag) -> None:
        """Build this sender's group (it waits for the engine's ranks) while watching the abort
        flag; a group that forms after an abort is dropped as it forms."""
        name, address, port = join.groups[stage]
        box: dict = {}

        def build():
            try:
                group = WeightUpdateGroup(address, port, join.world_size, group_name=name,
                                          backend=join.backend, timeout=info.timeout)
            except Exception as e:  # noqa: BLE001 -- reported by the waiting thread
                box["error"] = e
                return
            with lock:
                if box.get("abandoned"):
                    group.destroy()
                else:
                    box["group"] = group

        lock = threading.Lock()
        thread = threading.Thread(target=build, daemon=True, name=f"{name}-join")
        thread.start()
        try:
            _wait(lambda: not thread.is_alive(), abort, f"joining {name}")
        except SyncAborted:
            with lock:
                box["abandoned"] = True
            raise
        if "error" in box:
            abort.set()
            raise box["error"]
        self.group = box["group"]

    def _send(self, chunks, mapping: Mapping, bucket_bytes: int, abort: AbortFlag,
              error: str | None) -> str | None:
        """Every rank runs the export to its end (the TP all-gathers are collective); the
        senders broadcast their stage's buckets until the first failure anywhere."""
        stream = export_hf_weights(chunks, mapping, dest="stage")
        for bucket in bucket_by_bytes(stream, bucket_bytes):
            if self.group is None or error is not None:
                continue  # not a sender, or draining after a failure
            try:
                for flat in flatten_bucket(bucket):
                    work = self.group.broadcast(flat.tensor.view(torch.uint8))
                    _wait(work.is_completed, abort, self.group.group_name)
                    work.wait()
            except Exception as e:  # noqa: BLE001 -- agreed on by all ranks
                abort.set()
                self._close(pending=True)  # the engine's side of the broadcast fails, not hangs
                error = f"{type(e).__name__}: {e}"
        return error

    def _close(self, pending: bool = False) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.destroy(abort=pending)


def _first_cause(error: str | None) -> str:
    """Collective: the failure every rank reports -- the first rank's that is not only the
    echo of another's (SyncAborted), so each rank's log names the cause."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    rank, cause = next(((r, e) for r, e in failed if not e.startswith(SyncAborted.__name__)),
                       failed[0])
    return f"rank {rank}: {cause}"


class _Driver:
    """The engine's side of one sync, in a thread of the rank that owns the engine client."""

    def __init__(self, engine, requests, version: int, abort: AbortFlag, join: GroupJoin | None):
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="weight-receive",
                                       args=(engine, requests, version, abort, join))
        self.thread.start()

    def _run(self, engine, requests, version, abort, join):
        try:
            engine.receive_weights(requests, version, abort=abort, join=join)
        except Exception as e:  # noqa: BLE001 -- agreed on by all ranks
            abort.set()
            self.error = f"{type(e).__name__}: {e}"
            # now, not after the agreement: a sender whose broadcast the engine never joined
            # is released when the engine's end of the group goes
            engine.leave_weight_groups()

    def join(self) -> str | None:
        self.thread.join()
        return self.error
