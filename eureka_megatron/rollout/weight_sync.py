"""Weight sync: stream the Megatron model's HF-named tensors, in buckets, into a rollout engine.

Every training rank calls `sync_weights` together (the export is collective); the rank that owns
an engine hands it the bucket stream, every other rank passes `engine=None`. If the engine fails
mid-sync, the export is still drained to the end so the other ranks never hang, the failure is
agreed on by all ranks, and the engine is left at weight version None (it refuses to generate).
`sync_with_restart` then restarts the engine and syncs again: no stale or half-updated weights
are ever served, and the version the engine reports says which weights it holds.

The engine's `weight_transport` picks the path: "tensor" (the default: the export's tensors are
handed to the engine on its rank) or "distributed" (engines on GPUs of their own: each pipeline
stage's sender broadcasts to them, weight_broadcast.py, with the same failure contract).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from eureka_megatron.models.mapping import Mapping
from eureka_megatron.rollout.buckets import bucket_by_bytes
from eureka_megatron.rollout.weight_broadcast import WeightBroadcaster
from eureka_megatron.rollout.weight_export import export_hf_weights
from eureka_megatron.runtime.distributed import all_ranks_true, broadcast_object

DEFAULT_BUCKET_BYTES = 512 << 20


@dataclass
class SyncResult:
    version: int
    ok: bool
    seconds: float
    bytes: int          # HF tensor bytes streamed to this rank's engine (broadcast: all stages)
    tensors: int
    attempts: int = 1
    error: str | None = None

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


class _Counted:
    """Passes the export stream through, counting tensors and bytes."""

    def __init__(self, stream: Iterator[tuple[str, torch.Tensor]]):
        self.stream, self.bytes, self.tensors = stream, 0, 0

    def __iter__(self):
        for name, t in self.stream:
            self.bytes += t.numel() * t.element_size()
            self.tensors += 1
            yield name, t


def sync_weights(chunks: list[torch.nn.Module], mapping: Mapping, engine, version: int, *,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, dest: str = "rank0",
                 broadcaster: WeightBroadcaster | None = None) -> SyncResult:
    """Collective: export the model's weights and load them into `engine` (on the ranks that
    have one) as `version`. Returns the same `ok` on every rank.

    broadcaster: this rank's `WeightBroadcaster` for engines whose transport is "distributed"
        (it keeps the weight-update groups between syncs); without one, the groups live for
        this sync only."""
    start = time.perf_counter()
    transport = broadcast_object(getattr(engine, "weight_transport", "tensor")
                                 if engine is not None else None)
    if transport == "distributed":
        own = broadcaster or WeightBroadcaster()
        try:
            out = own.sync(chunks, mapping, engine, version, bucket_bytes=bucket_bytes)
        finally:
            if broadcaster is None:
                own.close(engine)
        return SyncResult(version, out.ok, time.perf_counter() - start, out.bytes, out.tensors,
                          error=out.error)
    counted = _Counted(export_hf_weights(chunks, mapping, dest=dest))
    stream = iter(counted)
    ok, error = True, None
    if engine is not None:
        try:
            engine.update_weights(bucket_by_bytes(stream, bucket_bytes), version)
        except Exception as e:  # noqa: BLE001 -- any engine failure: drain, agree, report
            ok, error = False, f"{type(e).__name__}: {e}"
    for _ in stream:  # keep the collective export in step with the other ranks
        pass
    ok = all_ranks_true(ok)
    if not ok and error is None:
        error = "an engine on another rank failed"
    return SyncResult(version, ok, time.perf_counter() - start, counted.bytes, counted.tensors,
                      error=error)


def sync_with_restart(chunks: list[torch.nn.Module], mapping: Mapping, engine, version: int, *,
                      retries: int = 1, **kw) -> SyncResult:
    """`sync_weights`, and on failure restart the engine(s) and sync again (up to `retries`)."""
    errors = []
    for attempt in range(1, retries + 2):
        result = sync_weights(chunks, mapping, engine, version, **kw)
        result.attempts = attempt
        if result.ok:
            return result
        errors.append(result.error)
        if engine is not None:
            engine.restart()
    raise RuntimeError(f"weight sync to version {version} failed {len(errors)} times: "
                       + "; ".join(str(e) for e in errors))
