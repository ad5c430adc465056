"""The rollout side of an RL run: engine, prompt stream, reward pool, held-out set and metrics
writer, all on the driver rank (0). Every rank holds a `RolloutService`; each method is
collective and returns the driver's result on every rank, so the loop never asks which rank it
is on.

Engine failures are survived: `collect` restarts the engine, has the actor resync it and samples
again (at most `MAX_ENGINE_RESTARTS` times a run). Off-policy (`train.mode: off-policy`) the
next step's batch is sampled in a background thread while this step trains (`prefetch`).
Colocated SGLang engines free their GPU memory while the actor trains (`release_memory`) and take
it back before the weight sync (`resume_memory`).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoTokenizer

from eureka_megatron.config import RLConfig
from eureka_megatron.data.dataset import PromptStream
from eureka_megatron.data.sources import eval_rows, prompt_builder, train_rows
from eureka_megatron.rewards.pool import RewardPool
from eureka_megatron.runtime.distributed import broadcast_object
from eureka_megatron.trainer.collect import Collector, EngineFailure, RolloutBatch, greedy_accuracy
from eureka_megatron.trainer.engines import build_engine
from eureka_megatron.trainer.metrics import METRICS_FILE, MetricsWriter, truncate_after

MAX_ENGINE_RESTARTS = 3


def frees_engine_memory(cfg: RLConfig) -> bool:
    """Colocated SGLang engines give their GPU memory to the trainer between rollout and sync (an
    in-process HF engine has nothing of its own to free)."""
    return cfg.cluster.colocate and cfg.rollout.engine == "sglang"


class Prefetch:
    """Off-policy: the next step's rollout, collected in a background thread on the driver."""

    def __init__(self, collector: Collector, step: int):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(collector, step), daemon=True)
        self.thread.start()

    def _run(self, collector, step):
        try:
            self.result = collector.collect(step)
        except EngineFailure as e:
            self.result = e

    def join(self):
        self.thread.join()
        return self.result


class RolloutService:
    def __init__(self, cfg: RLConfig, hf_dir: Path, family: str,
                 wrap_engine: Callable | None = None):
        """Engines, data and rewards for a run from `hf_dir` (started before the actor, so that
        colocated engines claim their GPUs first); `restore` then places it at the run's start.
        `wrap_engine` wraps the engine (tests inject failures with it)."""
        self.cfg = cfg
        self.is_driver = torch.distributed.get_rank() == 0
        self.engine = None  # the driver's; None on every other rank
        self.restarts = 0
        self._pending = None  # a batch sampled before the checkpoint, not trained
        self._prefetch: Prefetch | None = None
        pad_id = None
        if self.is_driver:
            self.tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
            builder = prompt_builder(cfg, family, self.tokenizer)
            loaded = train_rows(cfg)
            self.stream = PromptStream(loaded.rows, builder, seed=cfg.train.seed,
                                       shuffle=cfg.data.shuffle)
            self.eval_items = []
            for row in eval_rows(cfg):
                try:
                    self.eval_items.append(builder.build(row))
                except ValueError:
                    continue
            engine = build_engine(cfg, hf_dir)
            self.engine = wrap_engine(engine) if wrap_engine is not None else engine
            self.pool = RewardPool(cfg.rewards.functions, cfg.rewards.weights,
                                   num_workers=cfg.rewards.num_workers,
                                   timeout=cfg.rewards.timeout, memoize=cfg.rewards.memoize)
            self.collector = Collector(cfg, self.engine, self.pool, self.stream,
                                       len(loaded.skipped))
            pad = getattr(self.tokenizer, "pad_token_id", None)
            pad_id = int(pad) if pad is not None else 0
        self.pad_id: int = broadcast_object(pad_id)

    def restore(self, start: int, state: dict | None = None) -> None:
        """Continue after step `start` (0: a new run) from what `state_dict` returned when the
        run was checkpointed: the stream's position, the batch sampled ahead, the restarts."""
        state = state or {}
        self.restarts = int(state.get("engine_restarts", 0))
        self._pending = state.get("pending")
        if self.is_driver:
            if state.get("stream"):
                self.stream.load_state_dict(state["stream"])
            out = Path(self.cfg.output.dir)
            truncate_after(out / METRICS_FILE, start)
            self.writer = MetricsWriter(out, total_steps=self.cfg.train.steps, start_step=start,
                                        tensorboard=self.cfg.output.tensorboard,
                                        progress=self.cfg.output.progress)

    # --- one step ------------------------------------------------------------------------------

    def collect(self, step: int, resync: Callable[[], object]) -> RolloutBatch:
        """Generate -> rewards -> online filter for `step` (or take the batch sampled ahead), on
        every rank. A failed engine was restarted; `resync()` loads the weights back into it."""
        while True:
            result = None
            if self.is_driver:
                try:
                    result = self._take_pending(step)
                except EngineFailure as e:
                    result = e
            result = broadcast_object(result)
            if not isinstance(result, EngineFailure):
                result.metrics["rollout/engine_restarts"] = float(self.restarts)
                return result
            self.restarts += 1
            if self.restarts > MAX_ENGINE_RESTARTS:
                raise RuntimeError(f"rollout engine failed {self.restarts} times; last: {result}")
            resync()

    def _take_pending(self, step: int) -> RolloutBatch:
        pending, self._pending = self._pending, None
        return pending if pending is not None else self.collector.collect(step)

    def prefetch(self, step: int) -> None:
        """Off-policy: start sampling `step`'s batch with the current weights while this step
        trains (nothing to do on-policy, or after the last step)."""
        if (self.is_driver and self.cfg.train.mode == "off-policy"
                and step <= self.cfg.train.steps):
            self._prefetch = Prefetch(self.collector, step)

    def release_memory(self) -> None:
        """After the rollout, with nothing in flight: a colocated engine frees its weights and KV
        cache for the trainer."""
        if self.is_driver and self._prefetch is None and frees_engine_memory(self.cfg):
            self.engine.release_memory()

    def join_prefetch(self) -> None:
        """Off-policy, after training: wait for the batch sampled ahead (a failed one is sampled
        again next step, after the resync)."""
        if self._prefetch is not None:
            pending = self._prefetch.join()
            self._prefetch = None
            self._pending = None if isinstance(pending, EngineFailure) else pending

    def resume_memory(self) -> None:
        """Before the weight sync: a colocated engine takes its memory back (the sync then fills
        its weights); one that cannot is restarted (a fresh server holds its memory)."""
        if self.is_driver and frees_engine_memory(self.cfg):
            try:
                self.engine.resume_memory()
            except Exception:  # noqa: BLE001 -- the sync right after loads the weights either way
                self.engine.restart()

    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (driver's view; {} elsewhere and without a held-out set)."""
        if not self.is_driver or not self.eval_items:
            return {}
        t0 = time.perf_counter()
        m = greedy_accuracy(self.engine, self.pool, self.eval_items,
                            self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens)
        m["time/eval_s"] = time.perf_counter() - t0
        return m

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """The driver's metrics on every rank, written to metrics.jsonl / TensorBoard."""
        metrics = broadcast_object(metrics)
        if self.is_driver:
            self.writer.log(step, metrics)
        return metrics

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict | None:
        """What a resumed run needs: the prompt stream's position, the batch sampled ahead and
        the engine restarts so far (the driver's, on every rank)."""
        return broadcast_object({"stream": self.stream.state_dict(), "pending": self._pending,
                                 "engine_restarts": self.restarts} if self.is_driver else None)

    def close(self) -> None:
        if self.is_driver:
            self.writer.close()
            self.pool.close()
