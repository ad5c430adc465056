"""Rollout engines in Ray actors: `EngineActor` holds any `RolloutEngine`, `RemoteEngine` is the
`RolloutEngine` the trainer talks to.

Disaggregated engines (their own GPUs, possibly another node) and every engine on a multi-node
cluster live in a Ray actor. The trainer keeps the protocol it has with a local engine:
`RemoteEngine` forwards each call with a timeout, an actor that died or stopped answering raises
`EngineDeadError` (and `health()` says False), and `restart()` rebuilds the engine in place or,
if the actor is gone, starts a new actor in the same placement.

Weight sync streams: `update_weights` ships one bucket per actor call through the object store,
so neither side ever holds the whole model in flight. The actor feeds the buckets to the engine's
own `update_weights` from a thread (`begin_update` / `load_bucket` / `finish_update`, through
`bucket_stream.BucketFeed`), so the engine's checks apply unchanged; if the trainer's bucket
stream or the engine fails half-way, the engine's sync is aborted (`SyncAborted`) and it is left
at weight version None, exactly like a local engine.
An engine whose transport is "distributed" receives by broadcast straight from the trainer's
ranks instead (rollout/weight_broadcast.py); the actor runs its `receive_weights` in a thread
(`begin_receive` / `receive_done` / `abort_receive`), `RemoteEngine.receive_weights` polls it and
carries the sync's abort flag both ways.
Ray is imported lazily.
"""
from __future__ import annotations

import dataclasses
import os
import pkgutil
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from eureka_megatron.rollout.bucket_stream import BucketFeed
from eureka_megatron.runtime.layout import COLOCATED_ENGINE_GPU, Layout
from eureka_megatron.runtime.placement import bundle_gpu_ids, bundle_nodes, bundle_order, ray_init

if TYPE_CHECKING:  # the actor side imports no torch until the engine's factory does
    from eureka_megatron.rollout.buckets import FlatBucket
    from eureka_megatron.rollout.engine import NamedTensors, Prompt, Sample, SamplingParams


RECEIVE_POLL_S = 0.05  # how often RemoteEngine.receive_weights asks its actor


def resolve_factory(spec: str) -> Callable[..., Any]:
    """"module:function" or "module:Class.method" -> the callable."""
    if ":" not in spec:  # pkgutil would read a dotted name as modules and attributes
        raise ValueError(f"engine factory must be 'module:function' or 'module:Class.method', got {spec!r}")
    obj = pkgutil.resolve_name(spec)
    if not callable(obj):
        raise ValueError(f"engine factory {spec!r} is not callable")
    return obj


class EngineActor:
    """Holds one engine built by `factory(**kwargs)` ("module:function" / "module:Class.method").

    Becomes a Ray actor through `ray.remote(EngineActor)` at use time. `visible_devices` (GPU ids)
    widens CUDA_VISIBLE_DEVICES before the engine is built: an engine spanning several bundles
    sees all of its GPUs, not only the one Ray assigned to the actor's own bundle.
    """

    def __init__(self, factory: str, kwargs: dict, visible_devices: list[str] | None = None):
        if visible_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in visible_devices)
        self.engine = resolve_factory(factory)(**(kwargs or {}))
        self._sync: BucketFeed | None = None
        self._receiving: tuple[threading.Thread, threading.Event, dict] | None = None
        self.last_sync_buckets = 0

    # --- protocol -------------------------------------------------------------------------------

    def weight_layout(self) -> str:
        return self.engine.weight_layout

    def weight_version(self) -> int | None:
        return self.engine.weight_version

    def weight_transport(self) -> str:
        return getattr(self.engine, "weight_transport", "tensor")

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        return self.engine.generate(prompts, n, sampling)

    def update_weights(self, buckets: list[NamedTensors], version: int, partial: bool = False) -> None:
        """All buckets in one call (small models); `RemoteEngine` streams with begin/load/finish."""
        self.engine.update_weights(buckets, version, **({"partial": True} if partial else {}))

    def release_memory(self) -> None:
        self.engine.release_memory()

    def resume_memory(self) -> None:
        self.engine.resume_memory()

    def health(self) -> bool:
        return bool(self.engine.health())

    def restart(self) -> None:
        self.abort_update()
        self.abort_receive()
        self.engine.restart()

    # --- streamed sync --------------------------------------------------------------------------

    def begin_update(self, version: int, partial: bool = False) -> None:
        self.abort_update()
        self._sync = BucketFeed(self.engine, version, name=f"weight-sync-v{version}",
                                **({"partial": True} if partial else {}))

    def load_bucket(self, packed: list[FlatBucket]) -> None:
        """Returns once the engine has taken the bucket (`flatten_bucket`'s buffers) and asked
        for the next one."""
        from eureka_megatron.rollout.buckets import unflatten_bucket  # torch

        if self._sync is None:
            raise RuntimeError("load_bucket without begin_update")
        self._sync.push([named for flat in packed for named in unflatten_bucket(flat)])

    def finish_update(self) -> int | None:
        if self._sync is None:
            raise RuntimeError("finish_update without begin_update")
        sync, self._sync = self._sync, None
        self.last_sync_buckets = sync.buckets
        sync.end()
        error = sync.wait()
        if error is not None:
            raise error
        return self.engine.weight_version

    def abort_update(self) -> None:
        """Stop a sync in progress; the engine's update_weights fails, its version becomes None."""
        if self._sync is not None:
            sync, self._sync = self._sync, None
            self.last_sync_buckets = sync.buckets
            sync.end(abort=True)
            sync.wait(timeout=60.0)

    # --- broadcast sync ---------------------------------------------------------------------------

    def begin_receive(self, stages, version: int, join=None, aborted: bool = False) -> None:
        """The engine's receive_weights, in a thread (it waits on the trainer's broadcasts).
        `aborted`: the sync already failed elsewhere -- the engine sends no request at all (set
        before the thread starts, so its first look at the flag sees it)."""
        abort, box = threading.Event(), {}
        if aborted:
            abort.set()

        def run():
            try:
                self.engine.receive_weights(stages, version, abort=abort, join=join)
            except BaseException as e:  # noqa: BLE001 -- raised by receive_done
                box["error"] = e

        thread = threading.Thread(target=run, daemon=True, name=f"weight-receive-v{version}")
        self._receiving = (thread, abort, box)
        thread.start()

    def receive_done(self) -> bool:
        """False while receiving; True once done; the engine's error if it failed."""
        if self._receiving is None:
            raise RuntimeError("receive_done without begin_receive")
        thread, _, box = self._receiving
        if thread.is_alive():
            return False
        self._receiving = None
        if "error" in box:
            raise box["error"]
        return True

    def abort_receive(self) -> None:
        """The sync failed elsewhere: the engine sends no further request."""
        if self._receiving is not None:
            self._receiving[1].set()

    # --- extras ---------------------------------------------------------------------------------

    def call(self, method: str, *args, **kwargs):
        """Any other engine method (e.g. HFEngine.logits)."""
        return getattr(self.engine, method)(*args, **kwargs)

    def node_info(self) -> dict:
        import ray

        return {"ip": ray.util.get_node_ip_address(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                "last_sync_buckets": self.last_sync_buckets}


class _Spawner:
    """Picklable recipe for a new engine actor in the same place (RemoteEngine.restart)."""

    def __init__(self, factory: str, kwargs: dict, options: dict, visible_devices):
        self.factory, self.kwargs, self.options, self.visible_devices = factory, kwargs, options, visible_devices

    def __call__(self):
        import ray

        return ray.remote(EngineActor).options(**self.options).remote(
            self.factory, self.kwargs, self.visible_devices)


def _dead_errors():
    from ray.exceptions import (ActorPlacementGroupRemoved, ActorUnschedulableError, GetTimeoutError,
                                RayActorError, WorkerCrashedError)

    return (RayActorError, WorkerCrashedError, ActorPlacementGroupRemoved, ActorUnschedulableError,
            GetTimeoutError)


class RemoteEngine:
    """A RolloutEngine whose engine lives in a Ray actor elsewhere (the disaggregated layout, or any
    engine on another node): the same protocol; every call is a `ray.get` with `timeout`, a dead or
    silent actor raises `EngineDeadError`, errors of the engine itself arrive as their own type."""

    def __init__(self, handle, *, timeout: float = 600.0, health_timeout: float = 30.0,
                 respawn: Callable[[], Any] | None = None, name: str | None = None):
        self.handle = handle
        self.timeout, self.health_timeout = timeout, health_timeout
        self._respawn = respawn
        self.name = name or f"engine actor {handle._actor_id.hex()[:12]}"
        self.weight_layout: str = self._call("weight_layout")  # also waits for the engine to build
        self.weight_transport: str = self._call("weight_transport")

    def _call(self, method: str, *args, timeout: float | None = None, **kwargs):
        import ray

        from eureka_megatron.rollout.engine import EngineDeadError

        timeout = self.timeout if timeout is None else timeout
        ref = getattr(self.handle, method).remote(*args, **kwargs)
        try:
            return ray.get(ref, timeout=timeout)
        except _dead_errors() as e:
            if isinstance(e, ray.exceptions.GetTimeoutError):
                try:
                    ray.cancel(ref)  # drops it if still queued; a running call cannot be stopped
                except Exception:  # noqa: BLE001
                    pass
                raise EngineDeadError(f"{self.name} did not answer {method} within {timeout:g}s") from None
            raise EngineDeadError(f"{self.name} is dead ({method}): {type(e).__name__}: {e}") from None

    # --- protocol -------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int | None:
        """The actor's version; None when it is dead (no known weights are served)."""
        from eureka_megatron.rollout.engine import EngineDeadError

        try:
            return self._call("weight_version", timeout=self.health_timeout)
        except EngineDeadError:
            return None

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        return self._call("generate", prompts, n, sampling)

    def update_weights(self, buckets: Iterable[NamedTensors], version: int, *,
                       partial: bool = False) -> None:
        """Stream `buckets` one actor call each; any failure aborts the engine's sync (version
        None) and is raised here. A bucket travels packed, one fresh buffer per dtype: Ray pickles
        a tensor with its whole storage, and the export hands out views of the trainer's
        parameter buffers (a norm weight would carry gigabytes with it)."""
        from eureka_megatron.rollout.buckets import flatten_bucket  # torch

        self._call("begin_update", version, partial)
        try:
            for bucket in buckets:
                self._call("load_bucket", flatten_bucket(bucket))
            self._call("finish_update")
        except BaseException:
            try:
                self._call("abort_update", timeout=self.health_timeout)
            except Exception:  # noqa: BLE001 -- the original failure is what matters
                pass
            raise

    def receive_weights(self, stages, version: int, *, abort, join=None) -> None:
        """The engine receives the trainer's broadcasts in its actor; `abort` (the sync's flag)
        is passed on to it while it runs, and set here if it fails."""
        try:
            self._call("begin_receive", stages, version, join, abort.is_set())
            while not self._call("receive_done", timeout=self.health_timeout):
                if abort.is_set():
                    self._call("abort_receive", timeout=self.health_timeout)
                time.sleep(RECEIVE_POLL_S)
        except BaseException:
            abort.set()
            raise

    def receiver_info(self):
        """The engine's, with the actor's node for its address: the trainer's senders must offer
        an address that node reaches (its server may listen on loopback only)."""
        info = self._call("call", "receiver_info")
        ip = self.node_info()["ip"]
        return dataclasses.replace(info, url=f"http://[{ip}]" if ":" in ip else f"http://{ip}")

    def leave_weight_groups(self) -> None:
        from eureka_megatron.rollout.engine import EngineDeadError

        try:
            self._call("call", "leave_weight_groups", timeout=self.health_timeout)
        except EngineDeadError:
            pass  # a dead actor's server has no group left to leave

    def release_memory(self) -> None:
        self._call("release_memory")

    def resume_memory(self) -> None:
        self._call("resume_memory")

    def _answers(self) -> bool:
        """The actor is alive and answers (its engine may still be released or poisoned)."""
        from eureka_megatron.rollout.engine import EngineDeadError

        try:
            self._call("weight_layout", timeout=self.health_timeout)
            return True
        except EngineDeadError:
            return False

    def health(self) -> bool:
        from eureka_megatron.rollout.engine import EngineDeadError

        try:
            return bool(self._call("health", timeout=self.health_timeout))
        except EngineDeadError:
            return False

    def restart(self) -> None:
        """Restart the engine inside its actor; if the actor is dead, silent or cannot restart,
        kill it and start a new one in the same place (only for engines from `spawn_engine` /
        `placement.place_engines`). A silent actor is detected by `health()` (health_timeout),
        not by waiting out the full call timeout."""
        import ray

        from eureka_megatron.rollout.engine import EngineDeadError

        try:
            if self._respawn is not None and not self._answers():
                raise EngineDeadError(f"{self.name} does not answer")
            self._call("restart")
            return
        except Exception as e:  # noqa: BLE001 -- any failure: replace the actor if we can
            if self._respawn is None:
                raise EngineDeadError(f"{self.name} could not restart and cannot be respawned (not "
                                      f"created by spawn_engine): {e}") from e
        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # noqa: BLE001 -- already gone
            pass
        self.handle = self._respawn()
        self.weight_layout = self._call("weight_layout")
        self.weight_transport = self._call("weight_transport")

    # --- extras ---------------------------------------------------------------------------------

    def call(self, method: str, *args, **kwargs):
        """Any other method of the engine (e.g. HFEngine.logits)."""
        return self._call("call", method, *args, **kwargs)

    def node_info(self) -> dict:
        """Where the actor runs: ip, Ray GPU ids, CUDA_VISIBLE_DEVICES, pid, last sync's buckets."""
        return self._call("node_info", timeout=self.health_timeout)

    def kill(self) -> None:
        import ray

        ray.kill(self.handle, no_restart=True)


def spawn_engine(factory: str, kwargs: dict, *, num_cpus: float = 1, num_gpus: float = 0,
                 scheduling_strategy=None, visible_devices: list[str] | None = None,
                 timeout: float = 600.0, name: str | None = None) -> RemoteEngine:
    """Start an `EngineActor` (Ray started locally if it is not yet) and wait for its engine."""
    return spawn_engines([dict(factory=factory, kwargs=kwargs, num_cpus=num_cpus, num_gpus=num_gpus,
                               scheduling_strategy=scheduling_strategy,
                               visible_devices=visible_devices, name=name)], timeout=timeout)[0]


def spawn_engines(specs: list[dict], *, timeout: float = 600.0) -> list[RemoteEngine]:
    """`spawn_engine` for several engines (dicts of its keyword arguments), which build in
    parallel (an SGLang server takes minutes to start); if one fails, all are killed."""
    import ray

    ray_init()
    spawners, handles, names = [], [], []
    for spec in specs:
        spec = dict(spec)
        options: dict = {"num_cpus": spec.pop("num_cpus", 1), "num_gpus": spec.pop("num_gpus", 0),
                         "max_restarts": 0}
        strategy = spec.pop("scheduling_strategy", None)
        if strategy is not None:
            options["scheduling_strategy"] = strategy
        spawner = _Spawner(spec.pop("factory"), dict(spec.pop("kwargs", None) or {}), options,
                           spec.pop("visible_devices", None))
        names.append(spec.pop("name", None))
        if spec:
            raise TypeError(f"spawn_engines: unknown keys {sorted(spec)}")
        spawners.append(spawner)
        handles.append(spawner())
    try:
        return [RemoteEngine(h, timeout=timeout, respawn=s, name=n)
                for h, s, n in zip(handles, spawners, names)]
    except BaseException:
        for h in handles:
            ray.kill(h, no_restart=True)
        raise


# --- engines in a placement group ----------------------------------------------------------------------------------

def _engine_options(layout: Layout, pg, e: int, order: list[int]) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InBundle

    first = layout.engine_bundles[e][0]
    res = layout.bundles[first]
    if layout.colocated:  # the trainer rank of this bundle holds its CPUs; the engine takes turns
        cpus, gpus = 0, res.get("GPU", 0) * COLOCATED_ENGINE_GPU
    else:
        cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    return dict(num_cpus=cpus, num_gpus=gpus,
                scheduling_strategy=InBundle(pg, placement_group_bundle_index=order[first]))


def place_engines(layout: Layout, pg, factory: str, kwargs: dict, num_gpus_per_engine: int, *,
                  timeout: float = 600.0) -> list:
    """One engine actor per `layout.engine_bundles` entry, as `RemoteEngine`s that can respawn
    their actor in the same bundle on `restart()`.

    The actor sits in the engine's first bundle (a GPU share when colocated, the whole GPU
    otherwise) and sees the GPUs of all its bundles (CUDA_VISIBLE_DEVICES), in bundle order: a
    TP-wide SGLang server started there gets exactly the GPUs the plan gave the engine.
    """
    nodes, order = bundle_nodes(pg), bundle_order(pg)
    devices: list[list[str] | None] = [None] * len(layout.engine_bundles)
    if layout.use_gpus:
        for e, bundles in enumerate(layout.engine_bundles):
            if len(bundles) != num_gpus_per_engine:
                raise ValueError(f"engine {e} has {len(bundles)} GPU bundles in the layout, "
                                 f"num_gpus_per_engine is {num_gpus_per_engine}")
            where = {nodes[order[b]] for b in bundles}
            if len(where) > 1:
                raise RuntimeError(f"engine {e}'s bundles {bundles} landed on {len(where)} nodes; "
                                   f"are there gpus_per_node={layout.gpus_per_node} GPUs per node?")
        flat = [b for bundles in layout.engine_bundles for b in bundles]
        ids = dict(zip(flat, bundle_gpu_ids(pg, [order[b] for b in flat], timeout=timeout)))
        devices = [[ids[b][0] for b in bundles] for bundles in layout.engine_bundles]
    return spawn_engines([dict(factory=factory, kwargs=kwargs, visible_devices=devices[e],
                               name=f"engine{e}", **_engine_options(layout, pg, e, order))
                          for e in range(len(layout.engine_bundles))], timeout=timeout)

