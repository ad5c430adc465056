"""Where trainer ranks and rollout engines run: a pure plan (no Ray), checked by the config
before anything starts and realised by `runtime.placement`.

One placement group of identical bundles (one GPU each, or CPU slots without GPUs); trainer rank r
gets bundle `actor_bundles[r]`, engine e the bundles `engine_bundles[e]` -- the same ones as its
trainer ranks when colocated (trainer and engine take turns on each GPU), bundles after the
trainer's when disaggregated (engines own their GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK")
# GPU shares of a bundle when trainer and engine share its GPU: Ray must fit both in one bundle,
# and a little is left for `bundle_gpu_ids` probes. Disaggregated actors take the whole GPU.
COLOCATED_ACTOR_GPU = 0.5
COLOCATED_ENGINE_GPU = 0.4


@dataclass
class Layout:
    """Where actor (trainer) ranks and rollout engines go: bundle indices into one placement group."""
    bundles: list[dict[str, float]]        # e.g. {"GPU": 1, "CPU": 4}; on CPU-only {"CPU": n}
    actor_bundles: list[int]               # bundle of each trainer rank (rank order)
    engine_bundles: list[list[int]]        # bundles of each engine (TP-wide engines span several)
    colocated: bool
    strategy: str                          # "PACK" | "SPREAD" | "STRICT_PACK" (as ray)
    gpus_per_node: int = field(default=8, compare=False)

    @property
    def use_gpus(self) -> bool:
        return any(b.get("GPU", 0) > 0 for b in self.bundles)

    def describe(self) -> str:
        kind = "colocated" if self.colocated else "disaggregated"
        unit = "GPU" if self.use_gpus else "CPU slot"
        sizes = "/".join(map(str, sorted({len(b) for b in self.engine_bundles})))
        engines = (f"{len(self.engine_bundles)} engines x {sizes} {unit}(s), {kind}"
                   if self.engine_bundles else "no engines")
        return (f"{len(self.actor_bundles)} trainer ranks + {engines}, {len(self.bundles)} bundles "
                f"{self.bundles[0] if self.bundles else {}} ({self.strategy})")


def plan_layout(*, actor_world: int, engines: int, gpus_per_engine: int, colocate: bool,
                use_gpus: bool, gpus_per_node: int = 8, cpus_per_bundle: float = 1.0) -> Layout:
    """One bundle per GPU (or CPU slot); trainer ranks first, then (disaggregated) the engines.

    Colocated, engine e shares the bundles of ranks [e*g, (e+1)*g), so engines x gpus_per_engine
    must equal the trainer world. With GPUs an engine's GPUs must sit on one node (its TP group
    talks over NVLink), so gpus_per_engine divides gpus_per_node and no engine may straddle a node
    boundary; a trainer world larger than a node fills whole nodes.
    """
    for name, value, low in (("actor_world", actor_world, 1), ("engines", engines, 0),
                             ("gpus_per_engine", gpus_per_engine, 1), ("gpus_per_node", gpus_per_node, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if cpus_per_bundle < 0 or (not use_gpus and cpus_per_bundle <= 0):
        raise ValueError(f"cpus_per_bundle must be > 0{' (or 0 with GPUs)' if use_gpus else ''}, "
                         f"got {cpus_per_bundle}")
    g = gpus_per_engine
    if colocate and engines * g != actor_world:
        raise ValueError(f"colocated layout: engines x gpus_per_engine = {engines} x {g} = {engines * g} "
                         f"must equal the trainer world size {actor_world} (each engine shares the "
                         f"GPUs of its trainer ranks)")
    if use_gpus:
        if gpus_per_node % g:
            raise ValueError(f"gpus_per_engine {g} must divide gpus_per_node {gpus_per_node}: an "
                             f"engine's GPUs must all be on one node")
        if actor_world > gpus_per_node and actor_world % gpus_per_node:
            raise ValueError(f"a trainer world of {actor_world} GPUs spans nodes, so it must fill "
                             f"whole nodes: a multiple of gpus_per_node {gpus_per_node}")
    bundle = {"GPU": 1.0} if use_gpus else {}
    if cpus_per_bundle > 0:
        bundle["CPU"] = float(cpus_per_bundle)
    actor_bundles = list(range(actor_world))
    first = 0 if colocate else actor_world
    engine_bundles = [list(range(first + e * g, first + (e + 1) * g)) for e in range(engines)]
    total = actor_world if colocate else actor_world + engines * g
    if use_gpus:
        for e, b in enumerate(engine_bundles):
            if b[0] // gpus_per_node != b[-1] // gpus_per_node:
                raise ValueError(
                    f"engine {e} would span GPUs {b[0]}..{b[-1]} across nodes {b[0] // gpus_per_node} "
                    f"and {b[-1] // gpus_per_node}: the trainer's {actor_world} GPUs leave "
                    f"{gpus_per_node - actor_world % gpus_per_node} on its last node, not a multiple "
                    f"of gpus_per_engine {g}")
    strategy = "STRICT_PACK" if use_gpus and total <= gpus_per_node else "PACK"
    return Layout([dict(bundle) for _ in range(total)], actor_bundles, engine_bundles, colocate,
                  strategy, gpus_per_node)
