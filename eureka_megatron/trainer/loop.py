"""The RL loop (a rank function, collective over all ranks), reading like DESIGN.md's diagram:

    rollout -> rewards -> online filter  (driver rank: `collect.Collector`, broadcast to all)
    -> advantages -> old / ref log-probs -> train (epochs x mini-batches)   (`actor.Actor`)
    -> weight sync -> eval -> metrics -> checkpoint

On-policy: each step samples with the weights the previous step produced. Off-policy
(`train.mode: off-policy`): while step t trains, the driver already samples step t+1's batch
with the pre-update weights in a background thread, so rollout and training overlap and every
batch is one version stale (old log-probs are recomputed by the actor, so the first ratio is 1).
A rollout engine that fails is restarted and resynced, and the step samples again.
Colocated SGLang engines (`cluster.colocate`) release their GPU memory once the step's rollout is
collected and resume it just before the weight sync (on-policy; off-policy they keep sampling).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from eureka_megatron.rl_config import RLConfig
from eureka_megatron.runtime.distributed import broadcast_object
from eureka_megatron.trainer.batches import Sequence, dp_share
from eureka_megatron.trainer.collect import Collector, EngineFailure, RolloutBatch, greedy_accuracy

MAX_ENGINE_RESTARTS = 3


# --- setup ------------------------------------------------------------------------------------


@dataclass
class Driver:
    """What only the driver rank (0) holds: engine, rewards, data, metrics."""

    engine: object
    tokenizer: object
    pool: object
    stream: object
    eval_items: list
    collector: Collector
    writer: object


def build_engine(cfg: RLConfig, hf_dir: Path):
    if cfg.rollout.engine == "sglang":  # one server, or an EngineGroup of several (see engines.py)
        from eureka_megatron.trainer.engines import build_sglang_engine

        return build_sglang_engine(cfg, hf_dir)
    from eureka_megatron.rollout.hf_engine import HFEngine

    dtype = torch.bfloat16 if cfg.model.rollout_dtype == "bf16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFEngine.from_pretrained(hf_dir, dtype=dtype, device=device)


def build_driver(cfg: RLConfig, hf_dir: Path, family: str, start: int, wrap_engine=None) -> Driver:
    from transformers import AutoTokenizer

    from eureka_megatron.data.sources import eval_rows, prompt_builder, train_rows
    from eureka_megatron.data.dataset import PromptStream
    from eureka_megatron.rewards.pool import RewardPool
    from eureka_megatron.trainer.metrics import METRICS_FILE, MetricsWriter, truncate_after

    out = Path(cfg.output.dir)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    builder = prompt_builder(cfg, family, tokenizer)
    loaded = train_rows(cfg)
    stream = PromptStream(loaded.rows, builder, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    items = []
    for row in eval_rows(cfg):
        try:
            items.append(builder.build(row))
        except ValueError:
            continue
    engine = build_engine(cfg, hf_dir)
    if wrap_engine is not None:
        engine = wrap_engine(engine)
    pool = RewardPool(cfg.rewards.functions, cfg.rewards.weights,
                      num_workers=cfg.rewards.num_workers, timeout=cfg.rewards.timeout,
                      memoize=cfg.rewards.memoize)
    truncate_after(out / METRICS_FILE, start)
    writer = MetricsWriter(out, total_steps=cfg.train.steps, start_step=start,
                           tensorboard=cfg.output.tensorboard, progress=cfg.output.progress)
    return Driver(engine, tokenizer, pool, stream, items, Collector(cfg, engine, pool, stream, len(loaded.skipped)), writer)


# --- one stage per function ---------------------------------------------------------------------


def rollout(driver: Driver | None, actor, step: int, pending: RolloutBatch | None,
            restarts: list[int]) -> RolloutBatch:
    """The step's batch on every rank; engine failures are survived (restart, resync, retry)."""
    while True:
        result = None
        if driver is not None:
            try:
                result = pending if pending is not None else driver.collector.collect(step)
            except EngineFailure as e:
                result = e
        pending = None
        result = broadcast_object(result)
        if not isinstance(result, EngineFailure):
            result.metrics["rollout/engine_restarts"] = float(restarts[0])
            return result
        restarts[0] += 1
        if restarts[0] > MAX_ENGINE_RESTARTS:
            raise RuntimeError(f"rollout engine failed {restarts[0]} times; last: {result}")
        actor.sync_to(driver.engine if driver else None, version=step - 1)


def frees_engine_memory(cfg: RLConfig) -> bool:
    """Colocated SGLang engines give their GPU memory to the trainer between rollout and sync (an
    in-process HF engine has nothing of its own to free)."""
    return cfg.cluster.colocate and cfg.rollout.engine == "sglang"


def release_engine(driver: Driver | None, cfg: RLConfig) -> None:
    """After the step's rollout (nothing in flight): the engine frees weights and KV cache."""
    if driver is not None and frees_engine_memory(cfg):
        driver.engine.release_memory()


def resume_engine(driver: Driver | None, cfg: RLConfig) -> None:
    """Before the weight sync: the engine takes its memory back (the sync then fills its weights);
    an engine that cannot resume is restarted (a fresh server holds its memory)."""
    if driver is not None and frees_engine_memory(cfg):
        try:
            driver.engine.resume_memory()
        except Exception:  # noqa: BLE001 -- the sync right after loads the weights either way
            driver.engine.restart()


def to_sequences(batch: RolloutBatch, cfg: RLConfig) -> tuple[list[Sequence], torch.Tensor]:
    seqs, rewards = [], []
    for g, grp in enumerate(batch.groups):
        for ids, lp, r in zip(grp.response_ids, grp.rollout_logprobs, grp.rewards):
            seqs.append(Sequence(grp.prompt_ids, ids, grp.mm_inputs, 0.0, lp, group=g))
            rewards.append(r)
    rewards = torch.tensor(rewards, dtype=torch.float64)
    if cfg.algo.overlong_buffer > 0 and seqs:
        from eureka_megatron.algo.reward_shaping import overlong_penalty

        rewards = rewards + overlong_penalty([len(s.response_ids) for s in seqs],
                                             cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer,
                                             cfg.algo.overlong_factor)
    return seqs, rewards


def plan_micro_batches(seqs: list[Sequence], cfg: RLConfig, actor, pad_id: int):
    """Per mini-batch (whole groups), this DP rank's micro-batches, plus the sequence index of
    every row so advantages can be filled in later."""
    from megatron.core import parallel_state as ps

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    for i, s in enumerate(seqs):
        s.index = i
    groups = sorted({s.group for s in seqs})
    per_mini = max(1, len(groups) // cfg.train.mini_batches)
    minis = []
    for m in range(0, len(groups), per_mini):
        chosen = set(groups[m:m + per_mini])
        share = dp_share([s for s in seqs if s.group in chosen], dp_rank, dp)
        if not share:  # more DP ranks than sequences: nothing to train on this rank
            minis.append(([], []))
            continue
        mbs = actor.micro_batches(share, pad_id)
        rows, k = [], 0
        for mb in mbs:
            b = mb["input_ids"].shape[0]
            rows.append([share[k + j].index for j in range(b)])
            k += b
        minis.append((mbs, rows))
    return minis


def advantages(cfg: RLConfig, rewards: torch.Tensor, seqs, minis, old, ref) -> dict[str, float]:
    """Group-relative advantages (after KL-in-reward shaping), written into the micro-batches."""
    from eureka_megatron.algo.advantages import compute_advantages

    metrics = {}
    if cfg.algo.kl_in == "reward" and cfg.algo.kl_coef > 0:
        from eureka_megatron.algo.reward_shaping import kl_penalized_rewards

        local = {}
        for (mbs, rows), olds, refs in zip(minis, old, ref):
            for mb, idx, lp, rlp in zip(mbs, rows, olds, refs):
                _, kl = kl_penalized_rewards(torch.zeros(len(idx)), lp, rlp, mb["loss_mask"],
                                             cfg.algo.kl_coef, cfg.algo.kl_type)
                local.update(zip(idx, kl.tolist()))
        from megatron.core import parallel_state as ps

        parts = [None] * ps.get_data_parallel_world_size()
        torch.distributed.all_gather_object(parts, local, group=ps.get_data_parallel_group())
        kl = torch.zeros_like(rewards)
        for part in parts:
            for i, v in part.items():
                kl[i] = v
        rewards = rewards - cfg.algo.kl_coef * kl
        metrics["kl/reward_penalty"] = float(kl.mean())
    adv = compute_advantages(rewards, cfg.group_size, cfg.algo.estimator,
                             lengths=[len(s.response_ids) for s in seqs], whiten=cfg.algo.whiten,
                             grpo_eps=cfg.algo.grpo_eps,
                             clip_filter_like_cap=cfg.algo.clip_filter_like_cap)
    for mbs, rows in minis:
        for mb, idx in zip(mbs, rows):
            mb["advantages"] = adv[idx].float()
    metrics.update({"advantages/mean": float(adv.mean()), "advantages/abs_mean": float(adv.abs().mean()),
                    "advantages/max": float(adv.max()), "advantages/min": float(adv.min())})
    return metrics


def logprobs(actor, minis, cfg: RLConfig):
    """Old log-probs (when the batch is trained on more than once -- otherwise the training
    forward's own, detached, are exact -- or the KL goes into the reward) and reference log-probs
    (only with a KL term), computed with the training partition."""
    flat = [mb for mbs, _ in minis for mb in mbs]
    # the KL-in-reward penalty needs them at any batch reuse
    recompute = (cfg.train.mini_batches * cfg.train.epochs > 1
                 or (cfg.algo.kl_in == "reward" and cfg.algo.kl_coef > 0))
    old_flat = actor.logprobs(flat) if flat and recompute else [None] * len(flat)
    ref_flat = (actor.logprobs(flat, reference=True) if flat and actor.reference is not None
                else [None] * len(flat))

    def regroup(values):
        out, k = [], 0
        for mbs, _ in minis:
            out.append(values[k:k + len(mbs)])
            k += len(mbs)
        return out

    old, ref = regroup(old_flat), regroup(ref_flat)
    use_ref = cfg.algo.kl_in == "loss" and cfg.algo.kl_coef > 0
    for (mbs, _), olds, refs in zip(minis, old, ref):
        for mb, lp, rlp in zip(mbs, olds, refs):
            mb["old_logprobs"] = lp
            if use_ref:
                mb["ref_logprobs"] = rlp
    return old, ref


def train(actor, minis, cfg: RLConfig) -> dict[str, float]:
    """epochs x mini-batches optimizer steps; means of the metrics (max/min for *_max/*_min),
    and the first optimizer step's ratio and KL under `first/` (exactly 1 and 0 on-policy)."""
    forward = actor.policy_forward()
    runs = []
    for _ in range(cfg.train.epochs):
        for mbs, _ in minis:
            if not mbs:  # this DP rank's share of the mini-batch is empty (fewer rows than DP)
                continue
            runs.append(actor.train(mbs, forward))
    out = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if k in r]
        out[k] = max(vals) if k.endswith("_max") else min(vals) if k.endswith("_min") else sum(vals) / len(vals)
    for k in ("ratio_min", "ratio_max", "kl", "seq_ratio_min", "seq_ratio_max"):
        if k in runs[0]:
            out[f"first/{k}"] = runs[0][k]
    # the first forward runs the weights the engine sampled with (on-policy)
    agree = {"rollout/logprob_abs_diff_mean": runs[0].get("rollout_logprob_abs_diff", 0.0),
             "rollout/logprob_abs_diff_max": runs[0].get("rollout_logprob_abs_diff_max", 0.0),
             "rollout/k3_kl": runs[0].get("rollout_k3_kl", 0.0),
             "rollout/beyond_is_cap": runs[0].get("rollout_beyond_cap", 0.0)}
    out = {k if k.startswith(("first/", "lr", "grad_norm")) else f"train/{k}": v
           for k, v in out.items() if not k.endswith(("_sum", "_tsum"))
           and not k.startswith("rollout_") and k not in ("count", "tokens", "update_ok")}
    return {**out, **agree}


def evaluate(driver: Driver | None, cfg: RLConfig) -> dict[str, float]:
    if driver is None or not driver.eval_items:
        return {}
    t0 = time.perf_counter()
    m = greedy_accuracy(driver.engine, driver.pool, driver.eval_items,
                        cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens)
    m["time/eval_s"] = time.perf_counter() - t0
    return m


def eval_due(cfg: RLConfig, step: int) -> bool:
    return cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or step == cfg.train.steps)


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


# --- the loop ---------------------------------------------------------------------------------


def run_rl(cfg: RLConfig, *, stop_after: int | None = None,
           wrap_engine: Callable | None = None) -> list[dict]:
    """Train `cfg.train.steps` RL steps (resuming from `cfg.checkpoint.load`); returns the
    per-step metrics (rank 0's view, the same on every rank). `stop_after` ends this invocation
    after that many steps (tests emulate a kill with it); `wrap_engine` wraps the driver's engine
    (tests inject failures with it)."""
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer import checkpoint as ckpt
    from eureka_megatron.trainer.actor import Actor
    from eureka_megatron.trainer.warmup import format_warmup

    ckpt.check_run_dir(cfg.checkpoint_dir, cfg.checkpoint.load)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    hf_dir = format_warmup(cfg) if cfg.warmup.steps and not cfg.checkpoint.load else Path(cfg.model.hf)
    if cfg.checkpoint.load:
        hf_dir = _resume_source(cfg)
    cfg.model.hf = str(hf_dir)
    need_ref = cfg.algo.kl_coef > 0
    actor = Actor(cfg, need_reference=need_ref)
    start, extra = 0, {}
    if cfg.checkpoint.load:
        start, extra = ckpt.load_checkpoint(cfg.checkpoint.load, actor.model)
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    rank0 = torch.distributed.get_rank() == 0
    driver = build_driver(cfg, hf_dir, actor.family.name, start, wrap_engine) if rank0 else None
    pending = extra.get("pending")
    if driver is not None and extra.get("stream"):
        driver.stream.load_state_dict(extra["stream"])
    pad_id = broadcast_object(_pad_id(driver) if driver else None)
    actor.sync_to(driver.engine if driver else None, version=start)
    history: list[dict] = []
    restarts = [int(extra.get("engine_restarts", 0))]
    if start == 0 and cfg.eval.interval > 0:
        record = {"step": 0, **evaluate(driver, cfg), "time/unix_s": time.time()}
        if driver:
            driver.writer.log(0, {k: v for k, v in record.items() if k != "step"})
        history.append(broadcast_object(record))
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            t0 = time.perf_counter()
            batch = rollout(driver, actor, step, pending, restarts)
            pending = None
            prefetch = None
            if cfg.train.mode == "off-policy" and driver is not None and step < cfg.train.steps:
                prefetch = Prefetch(driver.collector, step + 1)
            if prefetch is None:  # nothing in flight: a colocated engine frees the GPUs to train
                release_engine(driver, cfg)
            metrics = dict(batch.metrics)
            seqs, rewards = to_sequences(batch, cfg)
            if len(seqs) >= dp:
                t1 = time.perf_counter()
                minis = plan_micro_batches(seqs, cfg, actor, pad_id)
                old, ref = logprobs(actor, minis, cfg)
                metrics.update(advantages(cfg, rewards, seqs, minis, old, ref))
                t2 = time.perf_counter()
                metrics.update(train(actor, minis, cfg))
                t3 = time.perf_counter()
                tokens = sum(len(s) for s in seqs) * cfg.train.epochs
                metrics.update({"time/logprobs_s": t2 - t1, "time/train_s": t3 - t2,
                                "train/tokens": float(tokens)})
            else:
                metrics["train/skipped"] = 1.0
                tokens = 0
            if prefetch is not None:
                pending = prefetch.join()
                if isinstance(pending, EngineFailure):
                    pending = None  # sampled again next step, after the resync below
            t4 = time.perf_counter()
            resume_engine(driver, cfg)
            sync = actor.sync_to(driver.engine if driver else None, version=step)
            metrics.update({"time/sync_s": time.perf_counter() - t4, "sync/attempts": float(sync.attempts),
                            "weight_version": float(step)})
            if eval_due(cfg, step):
                metrics.update(evaluate(driver, cfg))
            dt = time.perf_counter() - t0
            metrics.update({"time/step_s": dt, "tokens_per_s": tokens / dt,
                            "time/unix_s": time.time()})  # wall clock, e.g. for time to accuracy
            metrics = broadcast_object(metrics)
            if driver:
                driver.writer.log(step, metrics)
            history.append({"step": step, **metrics})
            _maybe_save(cfg, actor, step, driver, pending, restarts)
            _maybe_export(cfg, actor, step, hf_dir)
            if stop_after is not None and step - start >= stop_after:
                break
    finally:
        if driver is not None:
            driver.writer.close()
            driver.pool.close()
    if driver is not None and history and history[-1]["step"] == cfg.train.steps:
        from eureka_megatron.trainer.report import write_report

        write_report(cfg.output.dir, title="eureka-megatron RL run", settings=_settings(cfg, actor))
    return history


def _pad_id(driver: Driver) -> int:
    pad = getattr(driver.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _resume_source(cfg: RLConfig) -> Path:
    """The HF directory a resumed run was built from (the stage-0 output when there was one)."""
    stage0 = Path(cfg.output.dir) / "stage0_hf"
    return stage0 if cfg.warmup.steps and (stage0 / "config.json").is_file() else Path(cfg.model.hf)


def _maybe_save(cfg: RLConfig, actor, step: int, driver, pending, restarts) -> None:
    from eureka_megatron.trainer import checkpoint as ckpt

    c = cfg.checkpoint
    if not ((c.save_interval and step % c.save_interval == 0) or step == cfg.train.steps):
        return
    extra = broadcast_object({"stream": driver.stream.state_dict(), "pending": pending,
                        "engine_restarts": restarts[0]} if driver else None)
    ckpt.save_checkpoint(cfg.checkpoint_dir, step, actor.model, extra, c.keep_last)


def _maybe_export(cfg: RLConfig, actor, step: int, src: Path) -> None:
    o = cfg.output
    last = step == cfg.train.steps and o.hf_export
    if last or (o.hf_export_interval and step % o.hf_export_interval == 0):
        name = "hf_final" if last else f"hf_step_{step:08d}"
        actor.export_hf(Path(o.dir) / name, src)


def _settings(cfg: RLConfig, actor) -> dict:
    return {"model": f"{actor.family.name} ({cfg.model.hf})", "layout": cfg.parallel.describe(),
            "steps": cfg.train.steps, "prompts x samples": f"{cfg.train.rollout_batch_size} x {cfg.rollout.n_samples}",
            "algorithm": f"{cfg.algo.estimator} / {cfg.algo.loss} / {cfg.algo.agg}",
            "lr": cfg.optim.lr, "mode": cfg.train.mode, "engine": cfg.rollout.engine}


def describe(cfg: RLConfig) -> str:
    """The resolved layout, for `train --dry-run`."""
    from eureka_megatron.config import validate_layout
    from eureka_megatron.convert.families import family_for

    path = Path(cfg.model.hf) / "config.json"
    hf = json.loads(path.read_text())
    mcfg = family_for(hf, str(path)).config_from_hf(hf, Path(cfg.model.hf))
    validate_layout(getattr(mcfg, "text", mcfg), cfg.parallel)  # heads, layers, vocab vs TP/PP
    t, r = cfg.train, cfg.rollout
    engines = f"{r.engine} engine x{r.engines}"
    where = "colocated" if cfg.cluster.colocate else "disaggregated"
    if r.engine == "sglang":  # GPUs of their own unless colocated
        engines += f" of TP{r.gpus_per_engine}"
        extra = 0 if cfg.cluster.colocate else r.engines * r.gpus_per_engine
        where += f", {cfg.parallel.nproc + extra} GPUs in all"
    lines = [f"model        {hf.get('model_type')} from {cfg.model.hf}",
             f"actor        {cfg.parallel.describe()} ({cfg.cluster.launcher} launcher)",
             f"rollout      {engines}, {r.n_samples} samples/prompt, "
             f"T={r.temperature}, max {r.max_new_tokens} new tokens, {where}",
             f"batch        {t.rollout_batch_size} prompts x {r.n_samples} = "
             f"{t.rollout_batch_size * r.n_samples} sequences/step, {t.mini_batches} mini-batch(es), "
             f"{t.epochs} epoch(s), micro-batches <= {t.micro_batch_tokens} tokens",
             f"algorithm    {cfg.algo.estimator} advantages"
             f"{' (token-whitened)' if cfg.algo.whiten or cfg.algo.estimator == 'reinforce++' else ''}, "
             f"{cfg.algo.loss} loss ({cfg.algo.agg}), "
             f"filter {'[%g, %g]' % (cfg.algo.filter_low, cfg.algo.filter_high) if cfg.algo.online_filter else 'off'}, "
             f"kl {cfg.algo.kl_coef} ({cfg.algo.kl_in}), rollout IS {cfg.algo.rollout_is}",
             f"rewards      {', '.join(cfg.rewards.functions)} weights {cfg.rewards.weights}",
             f"data         {cfg.data.train or 'synthetic ' + '+'.join(cfg.data.synthetic_tasks)}",
             f"steps        {t.steps} ({t.mode}), warm-up {cfg.warmup.steps}, eval every {cfg.eval.interval}",
             f"output       {cfg.output.dir} (checkpoints: {cfg.checkpoint_dir})"]
    return "\n".join(lines)
