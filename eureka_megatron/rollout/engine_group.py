"""`EngineGroup`: the RolloutEngine seam over several engines (SGLang servers, Ray engine actors).

- generate: the prompts are cut into contiguous near-equal slices, one per engine, generated
  concurrently, and the samples come back in the original order with global prompt indices.
  Slice k starting at prompt `offset` samples with seed `sampling.seed + offset * n`: SGLang
  seeds request i's j-th sample with `seed + i * n + j`, so every sample gets the seed it would
  get on one engine (same seeds whatever the number of engines). The samples themselves equal
  one engine's only where seeds are honoured: the HF engine, and SGLang servers run with
  --enable-deterministic-inference (`rollout.deterministic`); otherwise SGLang ignores seeds.
- update_weights: the bucket stream is read once; each bucket goes to every engine (one thread
  per engine, each running that engine's own streaming `update_weights`), and the next bucket is
  read only when every engine has asked for it: the group holds one bucket at a time.
- receive_weights (engines whose weight_transport is "distributed"): every engine joins the same
  weight-update groups, one after the other in rank (engine e's ranks after engine e-1's), and
  receives every broadcast: one broadcast per bucket reaches all engines (slime's layout).
- weight_version: the lowest engine version, None if any engine's is None.
- release_memory / resume_memory / health: every engine, concurrently.
- restart: the engines that are not healthy; if all look healthy (the failure did not show in a
  health check) all of them, so `restart()` never silently does nothing.

With one engine every call goes straight to it: exactly that engine's behaviour and errors. With
several, an error names the engine (index and address) and keeps its type where it can.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from eureka_megatron.rollout.bucket_stream import BucketFeed, SyncAborted
from eureka_megatron.rollout.engine import (GroupJoin, NamedTensors, Prompt, ReceiverInfo, Sample,
                                            SamplingParams)


def _slices(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (start, stop) ranges covering range(total), sizes differing by <= 1."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for k in range(parts):
        stop = start + base + (1 if k < extra else 0)
        out.append((start, stop))
        start = stop
    return out


class EngineGroup:
    """A RolloutEngine over `engines` (each a RolloutEngine); see the module docstring."""

    def __init__(self, engines: Sequence[Any]):
        if not engines:
            raise ValueError("EngineGroup needs at least one engine")
        self.engines = list(engines)
        self.weight_layout = self._common("weight_layout")
        self.weight_transport = self._common("weight_transport", "tensor")

    # --- helpers --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.engines)

    def _name(self, i: int) -> str:
        e = self.engines[i]
        where = getattr(e, "url", None) or getattr(e, "name", None) or type(e).__name__
        return f"engine {i} of {len(self.engines)} ({where})"

    def _common(self, attr: str, default: Any = None) -> Any:
        """The engines' shared value of `attr` (the weight layout, the transport)."""
        values = [getattr(e, attr, default) for e in self.engines]
        if len(set(values)) > 1:
            raise ValueError(f"engines disagree on the {attr.replace('_', ' ')}: " + ", ".join(
                f"{self._name(i)}: {v!r}" for i, v in enumerate(values)))
        return values[0]

    def _tagged(self, i: int, e: BaseException, also: Sequence[int] = ()) -> BaseException:
        """`e` with the engine's name in front, of e's type when that type takes one message."""
        more = f" (engines {list(also)} failed too)" if also else ""
        msg = f"{self._name(i)}: {type(e).__name__}: {e}{more}"
        try:
            err = type(e)(msg)
        except Exception:  # noqa: BLE001 -- a type with another constructor
            err = RuntimeError(msg)
        return err if isinstance(err, Exception) else RuntimeError(msg)

    def _each(self, fn: Callable[[int], Any], indices: Sequence[int] | None = None) -> list:
        """fn(engine index) for the listed engines (all by default) concurrently; results in order. Every
        call runs to its end; then the first failure (lowest index, an abort caused by another
        engine's failure last) is raised, naming its engine."""
        indices = list(range(len(self.engines))) if indices is None else list(indices)
        if len(self.engines) == 1:
            return [fn(i) for i in indices]
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}

        def call(i):
            try:
                results[i] = fn(i)
            except Exception as e:  # noqa: BLE001 -- gathered, the first raised below
                errors[i] = e

        with ThreadPoolExecutor(max(1, len(indices))) as pool:
            list(pool.map(call, indices))
        if errors:  # the cause first: an engine that stopped because another failed is not
            first = min(errors, key=lambda i: (isinstance(errors[i], SyncAborted), i))
            others = sorted(set(errors) - {first})
            raise self._tagged(first, errors[first], others) from errors[first]
        return [results[i] for i in indices]

    # --- RolloutEngine --------------------------------------------------------------------------

    @property
    def weight_version(self) -> int | None:
        versions = [e.weight_version for e in self.engines]
        return None if any(v is None for v in versions) else min(versions)

    def generate(self, prompts: list[Prompt], n: int, sampling: SamplingParams) -> list[Sample]:
        """n samples per prompt, prompt i's at [i*n, (i+1)*n); slices on the engines in parallel."""
        if len(self.engines) == 1:
            return self.engines[0].generate(prompts, n, sampling)
        spans = [(i, a, b) for i, (a, b) in enumerate(_slices(len(prompts), len(self.engines)))
                 if b > a]
        if not spans:
            return []
        by_engine = {i: (a, b) for i, a, b in spans}

        def one(i):
            a, b = by_engine[i]
            seed = None if sampling.seed is None else sampling.seed + a * n
            samples = self.engines[i].generate(prompts[a:b], n, dataclasses.replace(sampling, seed=seed))
            if len(samples) != (b - a) * n:
                raise RuntimeError(f"gave {len(samples)} samples for {b - a} prompts x {n}")
            return [dataclasses.replace(s, prompt_index=s.prompt_index + a) for s in samples]

        return [s for part in self._each(one, [i for i, _, _ in spans]) for s in part]

    def update_weights(self, buckets: Iterable[NamedTensors], version: int) -> None:
        """Every bucket to every engine, the stream read once and one bucket at a time; engines
        that fail stop receiving, the others get the whole stream; then the first failure (lowest
        index) is raised, naming its engine (the failed engines' versions are None)."""
        if len(self.engines) == 1:
            return self.engines[0].update_weights(buckets, version)
        feeds = [BucketFeed(e, version, name=f"engine{i}-sync-v{version}")
                 for i, e in enumerate(self.engines)]
        live = [f for f in feeds if f.ready()]
        try:
            for bucket in buckets:
                for f in live:
                    f.put(bucket)
                del bucket
                live = [f for f in live if f.ready()]
                if not live:
                    break
        except BaseException:
            for f in feeds:
                f.end(abort=True)
            for f in feeds:
                f.wait()
            raise
        for f in feeds:
            f.end()
        outcomes = [f.wait() for f in feeds]
        errors = {i: e for i, e in enumerate(outcomes) if e is not None}
        if errors:
            first = min(errors)
            raise self._tagged(first, errors[first], sorted(errors)[1:]) from errors[first]

    def receive_weights(self, stages, version: int, *, abort,
                        join: GroupJoin | None = None) -> None:
        """Every engine receives every broadcast (concurrently: each broadcast needs them all);
        joining, engine e takes the ranks after those of the engines before it."""
        offsets = [join.rank_offset if join is not None else 0]
        for info in self._each(lambda i: self.engines[i].receiver_info())[:-1]:
            offsets.append(offsets[-1] + info.ranks)

        def one(i):
            mine = None if join is None else dataclasses.replace(join, rank_offset=offsets[i])
            self.engines[i].receive_weights(stages, version, abort=abort, join=mine)

        self._each(one)

    def receiver_info(self) -> ReceiverInfo:
        """The engines as one receiver: all their ranks; the groups every one of them joined."""
        infos = self._each(lambda i: self.engines[i].receiver_info())
        backends = {info.backend for info in infos}
        if len(backends) > 1:
            raise ValueError(f"engines disagree on the weight-update group backend: {backends}")
        return ReceiverInfo(infos[0].url, sum(info.ranks for info in infos), backends.pop(),
                            max(info.timeout for info in infos),
                            frozenset.intersection(*(info.joined for info in infos)))

    def leave_weight_groups(self) -> None:
        self._each(lambda i: self.engines[i].leave_weight_groups())

    def release_memory(self) -> None:
        self._each(lambda i: self.engines[i].release_memory())

    def resume_memory(self) -> None:
        self._each(lambda i: self.engines[i].resume_memory())

    def health(self) -> bool:
        return all(self.healths())

    def healths(self) -> list[bool]:
        """Each engine's health(), checked concurrently (an exception counts as unhealthy)."""
        def check(i):
            try:
                return bool(self.engines[i].health())
            except Exception:  # noqa: BLE001 -- cannot tell: not healthy
                return False
        return self._each(check)

    def restart(self) -> None:
        """Restart the unhealthy engines, or every engine when all report healthy; concurrently.
        Restarted engines serve version None (or their checkpoint's) until the next sync."""
        if len(self.engines) == 1:
            return self.engines[0].restart()
        sick = [i for i, ok in enumerate(self.healths()) if not ok]
        self._each(lambda i: self.engines[i].restart(), sick or None)
        self.weight_layout = self._common("weight_layout")

    # --- extras ---------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the servers this process launched (engines without `shutdown` are left alone)."""
        self._each(lambda i: getattr(self.engines[i], "shutdown", lambda: None)())

    def __repr__(self) -> str:
        return f"EngineGroup({self.engines!r})"
