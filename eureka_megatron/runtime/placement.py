"""Ray bring-up and placement: the Ray session, the placement group of a `runtime.layout.Layout`,
and launching ranks on it.

`launch_on_ray` has the contract of `runtime.launcher.launch` (results in rank order, a failing
rank raises `RankError` with its traceback and the others are killed) with ranks as Ray actors,
so the same training function runs on a multi-node cluster. Ray does not promise that bundle i
sits on node i // gpus_per_node, so plan indices go through `bundle_order` (bundles grouped by
node, nodes in order of their first bundle): ranks fill nodes in order and LOCAL_RANK means what
it means under torchrun. Ray (and torch) are imported inside the functions: the Ray actor side
and the CLI import this module without them.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from eureka_megatron.runtime.errors import RankError
from eureka_megatron.runtime.layout import COLOCATED_ACTOR_GPU, STRATEGIES, Layout, plan_layout
from eureka_megatron.runtime.ports import free_port

_PROBE_GPU = 0.01  # the GPU share of a `bundle_gpu_ids` probe task


# --- Ray session ------------------------------------------------------------------------------

_OWN_TEMP: str | None = None


def ray_init(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
             temp_dir: str | None = None, object_store_memory: int | None = None) -> None:
    """Start or join Ray once per process (later calls do nothing).

    address None starts a local instance -- unless RAY_ADDRESS is set (inside `ray job submit`),
    then that cluster is joined, as plain `ray.init()` does; "local" always starts one -- with
    token auth off (RAY_AUTH_MODE=disabled unless set: a local
    instance needs no token, and auth would write ~/.ray), a short temp dir (Ray's unix socket
    paths must stay under 108 bytes), no dashboard, and a 200 MB object store without CUDA (weight
    buckets are shipped one by one). "auto" or "ray://host:port" joins a running cluster, whose
    resources are the cluster's own (num_cpus/num_gpus are then ignored).
    """
    global _OWN_TEMP
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address != "local":
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if temp_dir is None:
        temp_dir = _OWN_TEMP = tempfile.mkdtemp(prefix="emray-", dir="/tmp")
    if object_store_memory is None:
        import torch

        object_store_memory = None if torch.cuda.is_available() else 200 << 20
    try:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 object_store_memory=object_store_memory, _temp_dir=temp_dir)
    except BaseException:
        ray_shutdown()  # a half-started instance and our temp dir must not outlive the error
        raise


def ray_shutdown() -> None:
    """Stop Ray in this process and remove the temp dir `ray_init` made for it."""
    global _OWN_TEMP
    import ray

    ray.shutdown()
    if _OWN_TEMP:
        shutil.rmtree(_OWN_TEMP, ignore_errors=True)
        _OWN_TEMP = None


# --- placement groups -------------------------------------------------------------------------

def create_placement_group(layout: Layout, *, timeout: float = 300.0):
    """The layout's placement group, ready; a TimeoutError says which resources are missing."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    if layout.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {layout.strategy!r}")
    pg = placement_group([dict(b) for b in layout.bundles], strategy=layout.strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout)
    if not ready:
        remove_placement_group(pg)
        raise TimeoutError(f"placement group not ready after {timeout:.0f}s: "
                           f"{_missing_resources(layout)}")
    return pg


def _missing_resources(layout: Layout) -> str:
    import ray

    need: dict[str, float] = {}
    for b in layout.bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0.0) + v
    total, free = ray.cluster_resources(), ray.available_resources()
    parts = [f"{k} {v:g} (cluster: {free.get(k, 0):g} free of {total.get(k, 0):g})"
             for k, v in sorted(need.items())]
    short = [k for k, v in need.items() if free.get(k, 0) < v]
    nodes = [f"{n.get('NodeManagerAddress')}: " + ", ".join(
        f"{k} {n['Resources'].get(k, 0):g}" for k in sorted(need)) for n in ray.nodes() if n.get("Alive")]
    msg = (f"{layout.describe()} needs {'; '.join(parts)}"
           + (f"; short of {', '.join(sorted(short))}" if short else "")
           + f"; nodes: {' | '.join(nodes)}")
    if layout.strategy == "STRICT_PACK":
        msg += "; STRICT_PACK needs every bundle on one node"
    return msg


def bundle_nodes(pg) -> list[str]:
    """The node id of each bundle of a ready placement group."""
    from ray.util.placement_group import placement_group_table

    table = placement_group_table(pg)["bundles_to_node_id"]
    return [table[i] for i in range(len(table))]


def bundle_order(pg) -> list[int]:
    """Placement-group bundle index for each plan index: bundles grouped by node (nodes ordered by
    their first bundle), bundle order kept within a node. Identical bundles make this legal."""
    nodes = bundle_nodes(pg)
    first = {}
    for i, n in enumerate(nodes):
        first.setdefault(n, i)
    return sorted(range(len(nodes)), key=lambda i: (first[nodes[i]], i))


def _probe_gpus():
    import ray

    return [str(i) for i in ray.get_gpu_ids()]


def bundle_gpu_ids(pg, bundles: list[int], *, timeout: float = 120.0) -> list[list[str]]:
    """The GPU ids Ray gives each listed PG bundle, by a tiny GPU-share probe task in each."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InBundle

    probe = ray.remote(_probe_gpus)
    refs = [probe.options(num_cpus=0, num_gpus=_PROBE_GPU, scheduling_strategy=InBundle(
        pg, placement_group_bundle_index=b)).remote() for b in bundles]
    return ray.get(refs, timeout=timeout)


# --- ranks on Ray -----------------------------------------------------------------------------

_CURRENT: tuple[Layout, Any] | None = None


def current_placement() -> tuple[Layout, Any] | None:
    """Inside a rank started by `launch_on_ray`: (layout, placement group), e.g. for rank 0 to
    `place_engines` into the trainer's own placement group; None elsewhere."""
    return _CURRENT


class _RankActor:
    """One trainer rank: reports where Ray put it, then runs the training function once."""

    def info(self) -> tuple[str, list[str]]:
        import ray

        return ray.util.get_node_ip_address(), [str(i) for i in ray.get_gpu_ids()]

    def free_port(self) -> int:
        return free_port("")

    def run(self, fn, args, kwargs, env: dict, threads: int, layout: Layout, pg):
        global _CURRENT
        os.environ.update({k: str(v) for k, v in env.items()})
        threads = max(1, threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # torch reads it when first imported
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        _CURRENT = (layout, pg)
        try:
            return "ok", fn(*args, **kwargs)
        except BaseException:  # noqa: BLE001 -- every failure must reach the driver
            return "error", traceback.format_exc()
        finally:
            if "torch" in sys.modules:  # a rank that never imported torch has no group to leave
                from eureka_megatron.runtime.distributed import shutdown

                shutdown()


def _rank_envs(layout: Layout, infos: list[tuple[str, list[str]]], port: int,
               extra: dict | None) -> list[dict]:
    """torchrun's variables per rank: nodes in order of their first rank, local ranks in rank
    order; with GPUs each rank sees its node's rank GPUs in local-rank order (device LOCAL_RANK
    is its own), as torchrun would show them."""
    node_of = [ip for ip, _ in infos]
    nodes = list(dict.fromkeys(node_of))
    envs = []
    for r, (ip, gpus) in enumerate(infos):
        peers = [q for q in range(len(infos)) if node_of[q] == ip]
        env = dict(extra or {})
        env.update(RANK=r, LOCAL_RANK=peers.index(r), WORLD_SIZE=len(infos),
                   LOCAL_WORLD_SIZE=len(peers), NODE_RANK=nodes.index(ip), GROUP_RANK=nodes.index(ip),
                   MASTER_ADDR=infos[0][0], MASTER_PORT=port)
        if layout.use_gpus:
            if len(gpus) != 1:
                raise RuntimeError(f"rank {r} was given GPUs {gpus} by Ray, expected exactly one")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(infos[q][1][0] for q in peers)
        envs.append({k: str(v) for k, v in env.items()})
    return envs


def launch_on_ray(fn: Callable[..., Any], nproc: int, *args, layout: Layout | None = None,
                  placement_group=None, timeout: float = 900.0, env: dict | None = None,
                  **kwargs) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `nproc` ranks as Ray actors; results in rank order.

    The layout defaults to `nproc` one-CPU bundles. Without `placement_group` one is created from
    the layout and removed at the end; pass one (from `create_placement_group`) to share it with
    engines placed beforehand. Each rank gets torchrun's env vars (MASTER_ADDR: rank 0's node,
    MASTER_PORT: free there), `env`, and as many torch threads as its bundle has CPUs. A failing
    or dead rank raises `RankError` at once and every rank actor is killed; `timeout` bounds the
    whole run (TimeoutError).
    """
    import ray
    from ray.exceptions import RayError
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as InBundle


    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if placement_group is not None and layout is None:
        raise ValueError("launch_on_ray: pass the layout the placement group was made from")
    layout = layout or plan_layout(actor_world=nproc, engines=0, gpus_per_engine=1, colocate=False,
                                   use_gpus=False)
    if len(layout.actor_bundles) != nproc:
        raise ValueError(f"the layout has {len(layout.actor_bundles)} trainer ranks, nproc is {nproc}")
    ray_init()
    deadline = time.monotonic() + timeout
    own_pg = placement_group is None
    pg = placement_group or create_placement_group(layout, timeout=timeout)
    actors = []
    try:
        order = bundle_order(pg)
        cls = ray.remote(_RankActor)
        for b in layout.actor_bundles:
            res = layout.bundles[b]
            gpu = res.get("GPU", 0) * (COLOCATED_ACTOR_GPU if layout.colocated else 1.0)
            actors.append(cls.options(num_cpus=res.get("CPU", 0), num_gpus=gpu, max_restarts=0,
                                      scheduling_strategy=InBundle(pg, order[b])).remote())

        def get(refs):
            left = deadline - time.monotonic()
            try:
                return ray.get(refs, timeout=max(left, 0.1))
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"rank actors did not start within {timeout:.0f}s") from None

        try:
            infos = get([a.info.remote() for a in actors])
            port = get(actors[0].free_port.remote())
        except RayError as e:
            raise RankError(f"a rank actor failed to start: {e}") from e
        envs = _rank_envs(layout, infos, port, env)
        pending = {a.run.remote(fn, args, kwargs, envs[r], int(layout.bundles[b].get("CPU", 1)),
                                layout, pg): r
                   for r, (a, b) in enumerate(zip(actors, layout.actor_bundles))}
        out: dict[int, Any] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(pending.values())} still running after {timeout:.0f}s")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(left, 5.0))
            for ref in done:
                r = pending.pop(ref)
                try:
                    status, payload = ray.get(ref)
                except RayError as e:
                    raise RankError(f"rank {r} died before returning a result: {e}") from None
                if status == "error":
                    raise RankError(f"rank {r} failed:\n{payload}")
                out[r] = payload
        return [out[r] for r in range(nproc)]
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        if own_pg:
            remove_placement_group(pg)
