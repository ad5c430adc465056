"""The RL loop (a rank function, collective over all ranks), reading like DESIGN.md's diagram:

    rollout -> rewards -> online filter      (`RolloutService`: driver rank, broadcast to all)
    -> old / ref log-probs -> [KL into the reward] -> advantages -> train   (`Actor`, `algo`)
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
import time
from pathlib import Path
from typing import Callable

import torch

from eureka_megatron.algo.advantages import compute_advantages
from eureka_megatron.algo.reward_shaping import overlong_penalty
from eureka_megatron.config import RLConfig
from eureka_megatron.data.sources import image_options
from eureka_megatron.models.llm_config import validate_layout
from eureka_megatron.models.registry import family_for
from eureka_megatron.models.routing_replay import check_config as check_routing_replay
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.trainer import checkpoint
from eureka_megatron.trainer.actor import Actor
from eureka_megatron.trainer.batches import Sequence
from eureka_megatron.trainer.collect import RolloutBatch
from eureka_megatron.trainer.report import write_report
from eureka_megatron.trainer.rollout_service import RolloutService
from eureka_megatron.trainer.warmup import format_warmup


def run_rl(cfg: RLConfig, *, stop_after: int | None = None,
           wrap_engine: Callable | None = None) -> list[dict]:
    """Train `cfg.train.steps` RL steps (resuming from `cfg.checkpoint.load`); returns the
    per-step metrics (rank 0's view, the same on every rank). `stop_after` ends this invocation
    after that many steps (tests emulate a kill with it); `wrap_engine` wraps the driver's engine
    (tests inject failures with it)."""
    run = RLRun(cfg, wrap_engine)
    actor, rollout = run.actor, run.rollout
    try:
        for step in run.steps(stop_after):
            batch = rollout.collect(step, resync=lambda: actor.sync_to(rollout.engine, step - 1))
            rollout.prefetch(step + 1)  # off-policy only
            rollout.release_memory()    # colocated engines, when nothing is in flight
            metrics = learn(actor, batch, cfg, rollout.pad_id)
            rollout.join_prefetch()
            metrics |= sync_engine(actor, rollout, step)
            if eval_due(cfg, step):
                metrics |= rollout.evaluate()
            run.end_step(step, metrics)  # log, checkpoint, HF export
    except BaseException:
        actor.checkpoints.abort()  # this rank's writer ends with it; nothing half-written is published
        raise
    finally:
        rollout.close()
    return run.finish()


class RLRun:
    """One RL run's state: the actor and the rollout service, built in order (process groups,
    stage-0 warm-up, rollout engines -- colocated ones then hand their memory to the trainer --,
    actor, resume, engines back, first weight sync), plus the history."""

    def __init__(self, cfg: RLConfig, wrap_engine: Callable | None = None):
        self.cfg = cfg
        checkpoint.check_run_dir(cfg.checkpoint_dir, cfg.checkpoint.load)
        init_distributed(cfg.parallel, seed=cfg.train.seed)
        self.hf_dir, megatron = start_checkpoint(cfg)
        family = family_for(json.loads((self.hf_dir / "config.json").read_text()))
        self.rollout = RolloutService(cfg, self.hf_dir, family.name, wrap_engine)
        self.rollout.release_memory()  # colocated engines started first: the actor fills the rest
        self.actor = Actor(cfg, need_reference=cfg.algo.kl_coef > 0, hf_dir=self.hf_dir,
                           megatron_dir=megatron)
        self.start, state = 0, {}
        if cfg.checkpoint.load:
            self.start, state = self.actor.load(cfg.checkpoint.load)
        self.rollout.restore(self.start, state)
        self.rollout.resume_memory()
        self.actor.sync_to(self.rollout.engine, version=self.start)
        self.history: list[dict] = []
        self._t0 = time.perf_counter()
        if self.start == 0 and cfg.eval.interval > 0:
            record = self.rollout.log(0, {**self.rollout.evaluate(), "time/unix_s": time.time()})
            self.history.append({"step": 0, **record})

    def steps(self, stop_after: int | None):
        """The steps this invocation runs; each step's clock starts when it is handed out."""
        last = self.cfg.train.steps
        if stop_after is not None:
            last = min(last, self.start + stop_after)
        for step in range(self.start + 1, last + 1):
            self._t0 = time.perf_counter()
            yield step

    def end_step(self, step: int, metrics: dict) -> None:
        dt = time.perf_counter() - self._t0
        metrics.update({"time/step_s": dt, "tokens_per_s": metrics.get("train/tokens", 0.0) / dt,
                        "time/unix_s": time.time()})  # wall clock, e.g. for time to accuracy
        self.history.append({"step": step, **self.rollout.log(step, metrics)})
        c, o, last = self.cfg.checkpoint, self.cfg.output, step == self.cfg.train.steps
        self.actor.checkpoints.poll()  # an async save that finished is published (collective)
        if (c.save_interval and step % c.save_interval == 0) or last:
            self.actor.save(self.cfg.checkpoint_dir, step, self.rollout.state_dict(), c.keep_last)
        if (last and o.hf_export) or (o.hf_export_interval and step % o.hf_export_interval == 0):
            name = "hf_final" if last and o.hf_export else f"hf_step_{step:08d}"
            self.actor.export_hf(Path(o.dir) / name)

    def finish(self) -> list[dict]:
        """The report, once the last step is done (and a pending checkpoint published); the
        history."""
        self.actor.checkpoints.finish()
        if self.rollout.is_driver and self.history and self.history[-1]["step"] == self.cfg.train.steps:
            write_report(self.cfg.output.dir, title="eureka-megatron RL run",
                         settings=settings(self.cfg, self.actor))
        return self.history


def learn(actor: Actor, batch: RolloutBatch, cfg: RLConfig, pad_id: int) -> dict[str, float]:
    """old / ref log-probs -> (KL-shaped) rewards -> advantages -> train, on every rank."""
    metrics = dict(batch.metrics)
    seqs, rewards = to_sequences(batch, cfg)
    t1 = time.perf_counter()
    plan = actor.plan(seqs, pad_id)
    if plan is None:  # fewer sequences than DP ranks
        return {**metrics, "train/skipped": 1.0, "train/tokens": 0.0}
    actor.logprobs(plan)
    if cfg.algo.kl_in == "reward" and cfg.algo.kl_coef > 0:
        kl = actor.sequence_kl(plan)
        rewards = rewards - cfg.algo.kl_coef * kl
        metrics["kl/reward_penalty"] = float(kl.mean())
    a = cfg.algo
    adv = compute_advantages(rewards, cfg.group_size, a.estimator,
                             lengths=[len(s.response_ids) for s in seqs], whiten=a.whiten,
                             grpo_eps=a.grpo_eps, clip_filter_like_cap=a.clip_filter_like_cap)
    metrics |= {"advantages/mean": float(adv.mean()), "advantages/abs_mean": float(adv.abs().mean()),
                "advantages/max": float(adv.max()), "advantages/min": float(adv.min())}
    t2 = time.perf_counter()
    metrics |= actor.train(plan, adv)
    metrics |= {"time/logprobs_s": t2 - t1, "time/train_s": time.perf_counter() - t2,
                "train/tokens": float(sum(len(s) for s in seqs) * cfg.train.epochs)}
    return metrics


def to_sequences(batch: RolloutBatch, cfg: RLConfig) -> tuple[list[Sequence], torch.Tensor]:
    """The batch's samples as trainer sequences, and their rewards [N] (with DAPO's overlong
    penalty when `algo.overlong_buffer` is set)."""
    seqs, rewards = [], []
    for g, grp in enumerate(batch.groups):
        routing = grp.routed_experts or [None] * len(grp.response_ids)
        for ids, lp, r, experts in zip(grp.response_ids, grp.rollout_logprobs, grp.rewards, routing):
            seqs.append(Sequence(grp.prompt_ids, ids, grp.mm_inputs, lp, group=g,
                                 routed_experts=experts))
            rewards.append(r)
    rewards = torch.tensor(rewards, dtype=torch.float64)
    if cfg.algo.overlong_buffer > 0 and seqs:
        rewards = rewards + overlong_penalty([len(s.response_ids) for s in seqs],
                                             cfg.rollout.max_new_tokens, cfg.algo.overlong_buffer,
                                             cfg.algo.overlong_factor)
    return seqs, rewards


def sync_engine(actor: Actor, rollout: RolloutService, step: int) -> dict[str, float]:
    """The engine takes its memory back (colocated), then holds this step's weights."""
    t0 = time.perf_counter()
    rollout.resume_memory()
    sync = actor.sync_to(rollout.engine, version=step)
    return {"time/sync_s": time.perf_counter() - t0, "sync/attempts": float(sync.attempts),
            "weight_version": float(step)}


def eval_due(cfg: RLConfig, step: int) -> bool:
    return cfg.eval.interval > 0 and (step % cfg.eval.interval == 0 or step == cfg.train.steps)


def start_checkpoint(cfg: RLConfig) -> tuple[Path, str | None]:
    """(HF dir, megatron weights or None) the actor starts from: the stage-0 output when there
    is a format warm-up (made now, or reused by a resumed run), else the configured model."""
    stage0 = Path(cfg.output.dir) / "stage0_hf"
    if cfg.warmup.steps and (not cfg.checkpoint.load or (stage0 / "config.json").is_file()):
        return format_warmup(cfg), None
    return cfg.model.hf_dir, cfg.model.megatron


def settings(cfg: RLConfig, actor: Actor) -> dict:
    return {"model": f"{actor.family.name} ({cfg.model.megatron or cfg.model.hf})", "layout": cfg.parallel.describe(),
            "steps": cfg.train.steps, "prompts x samples": f"{cfg.train.rollout_batch_size} x {cfg.rollout.n_samples}",
            "algorithm": f"{cfg.algo.estimator} / {cfg.algo.loss} / {cfg.algo.agg}",
            "lr": cfg.optim.lr, "mode": cfg.train.mode, "engine": cfg.rollout.engine}


def describe(cfg: RLConfig) -> str:
    """The resolved layout, for `train --dry-run`."""
    path = cfg.model.hf_dir / "config.json"
    hf = json.loads(path.read_text())
    fam = family_for(hf, str(path))
    mcfg = fam.config_from_hf(hf, cfg.model.hf_dir)
    validate_layout(getattr(mcfg, "text", mcfg), cfg.parallel)  # heads, layers, vocab vs TP/PP
    fam.check_layout(mcfg, cfg.parallel)  # the family's own (Qwen3-VL: DeepStack on stage 0)
    check_routing_replay(cfg.rollout.routing_replay, getattr(mcfg, "text", mcfg))
    if fam.is_vlm:
        image_options(cfg, fam.name)  # the pixel range, and what SGLang's processor would not do
    t, r = cfg.train, cfg.rollout
    engines = f"{r.engine} engine x{r.engines}"
    where = "colocated" if cfg.cluster.colocate else "disaggregated"
    if r.engine == "sglang":  # GPUs of their own unless colocated
        engines += f" of TP{r.gpus_per_engine}"
        extra = 0 if cfg.cluster.colocate else r.engines * r.gpus_per_engine
        where += f", {cfg.parallel.nproc + extra} GPUs in all"
    lines = [f"model        {hf.get('model_type')} from {cfg.model.megatron or cfg.model.hf}",
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
