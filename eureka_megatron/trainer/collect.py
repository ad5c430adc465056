"""Rollout collection on the driver rank: generate -> rewards -> online filter, until the batch is full.

MM-Eureka keeps sampling until the train batch holds `rollout_batch_size` groups whose accuracy
passes the online filter. The first round samples a full batch of prompts; each later round only
as many fresh prompts as the keep rate measured so far in this step says will fill the missing
groups (at least the number missing, at most a full batch), so little generation is thrown away;
passing groups are kept in order. After `max_filter_rounds` rounds the step trains on what it
has (its `filter/underfull` metric says so). Without an `accuracy` score (custom reward
functions) there is nothing to filter on: the filter is skipped, with one warning. Reward and reflection metrics cover every generated sample,
not only the kept ones, so they show the policy rather than the filter.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from eureka_megatron.algo.filtering import online_filter
from eureka_megatron.rewards.reflection import DEFAULT_REFLECTION_PHRASES, reflection_metrics
from eureka_megatron.config import RLConfig
from eureka_megatron.rollout.engine import SamplingParams
from eureka_megatron.stats import mean


@dataclass
class Group:
    """One prompt and its n responses (what the trainer needs of them; no images)."""

    prompt_ids: list[int]
    mm_inputs: dict
    answer: str
    response_ids: list[list[int]]
    rollout_logprobs: list[list[float]]
    rewards: list[float]
    accuracy: list[float]
    routed_experts: list | None = None  # per response, the engine's routing (routing replay)


@dataclass
class RolloutBatch:
    groups: list[Group]
    metrics: dict[str, float] = field(default_factory=dict)


class EngineFailure(RuntimeError):
    """The rollout engine failed mid-generation; it was restarted and needs a weight sync."""


log = logging.getLogger(__name__)


def prompts_to_sample(want: int, kept: int, generated: int, round_: int) -> int:
    """Prompts for this filter round: a full batch first; then the missing groups divided by
    the keep rate so far (all of a batch while nothing was kept), within [missing, want]."""
    missing = want - kept
    if round_ == 0 or kept == 0:
        return want
    rate = kept / generated
    return max(missing, min(want, math.ceil(missing / rate)))


class Collector:
    """Driver-rank rollout: owns the engine, the reward pool and the prompt stream."""

    def __init__(self, cfg: RLConfig, engine, pool, stream, skipped_at_load: int = 0):
        self.cfg, self.engine, self.pool, self.stream = cfg, engine, pool, stream
        self.skipped_at_load = skipped_at_load
        self.phrases = tuple(cfg.rewards.reflection_phrases or DEFAULT_REFLECTION_PHRASES)
        self.warned_no_accuracy = False

    def sampling(self, step: int, round_: int) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens,
                              seed=(self.cfg.train.seed * 1_000_003 + step * 101 + round_) % 2**63,
                              return_routed_experts=r.routing_replay)

    def collect(self, step: int) -> RolloutBatch:
        cfg = self.cfg
        n, want = cfg.rollout.n_samples, cfg.train.rollout_batch_size
        t0 = time.perf_counter()
        kept: list[Group] = []
        texts, accs, fmts, totals, lengths, rounds, generated = [], [], [], [], [], 0, 0
        versions: list[int] = []
        counters: dict[str, float] = {}
        generate_s = reward_s = 0.0
        while len(kept) < want and rounds < cfg.rollout.max_filter_rounds:
            items = self.stream.next_batch(prompts_to_sample(want, len(kept), generated, rounds))
            t_gen = time.perf_counter()
            try:
                samples = self.engine.generate([it.prompt for it in items], n,
                                               self.sampling(step, rounds))
            except Exception as e:  # noqa: BLE001 -- any engine failure: restart, resync, retry
                self.engine.restart()
                raise EngineFailure(f"{type(e).__name__}: {e}") from e
            generate_s += time.perf_counter() - t_gen
            rounds += 1
            generated += len(items)
            versions += [s.weight_version for s in samples]
            answers = [items[s.prompt_index].answer for s in samples]
            metas = [items[s.prompt_index].meta for s in samples]
            t_score = time.perf_counter()
            scored = self.pool.score([s.text for s in samples], answers, metas)
            reward_s += time.perf_counter() - t_score
            for k, v in scored.counters.items():
                counters[k] = counters.get(k, 0) + v
            acc = scored.scores.get("accuracy", [0.0] * len(samples))
            texts += [s.text for s in samples]
            accs += acc
            fmts += scored.scores.get("format", [])
            totals += scored.total
            lengths += [len(s.token_ids) for s in samples]
            if cfg.algo.online_filter and "accuracy" not in scored.scores:
                self._warn_no_accuracy(scored.scores)
            if cfg.algo.online_filter and "accuracy" in scored.scores:
                keep = online_filter(acc, n, cfg.algo.filter_low, cfg.algo.filter_high).tolist()
            else:
                keep = [True] * len(samples)
            for g, item in enumerate(items):
                if len(kept) == want or not keep[g * n]:
                    continue
                rows = samples[g * n:(g + 1) * n]
                kept.append(Group(prompt_ids=list(item.prompt.input_ids),
                                  mm_inputs=item.prompt.mm_inputs, answer=item.answer,
                                  response_ids=[s.token_ids for s in rows],
                                  rollout_logprobs=[s.logprobs for s in rows],
                                  rewards=scored.total[g * n:(g + 1) * n],
                                  accuracy=acc[g * n:(g + 1) * n],
                                  routed_experts=_routing(rows)))
        metrics = {"rewards/total": mean(totals), "rewards/accuracy": mean(accs),
                   "rewards/format": mean(fmts), "filter/rounds": float(rounds),
                   # weights the samples came from: step - 1 on-policy, step - 2 off-policy
                   "rollout/weight_version": float(min(versions)) if versions else float("nan"),
                   "filter/keep_rate": len(kept) / max(generated, 1),
                   "filter/groups": float(len(kept)),
                   "filter/underfull": float(len(kept) < want),
                   "data/skipped_rows": float(self.skipped_at_load + self.stream.skipped),
                   "time/rollout_s": time.perf_counter() - t0,
                   # parts of it, summed over filter rounds: engine.generate and pool.score
                   "time/generate_s": generate_s, "time/reward_s": reward_s}
        metrics.update({k: float(v) for k, v in counters.items()})
        metrics.update(reflection_metrics(texts, accs, lengths, cfg.rollout.max_new_tokens,
                                          self.phrases))
        return RolloutBatch(kept, metrics)

    def _warn_no_accuracy(self, scores: dict) -> None:
        if self.warned_no_accuracy:
            return
        self.warned_no_accuracy = True
        log.warning("algo.online_filter is on, but the reward functions give no 'accuracy' score "
                    "(they give %s): the filter has nothing to filter on and is skipped. Return "
                    "an 'accuracy' score to filter, or set algo.online_filter=false.",
                    sorted(scores) or "none")


def _routing(samples) -> list | None:
    """The samples' recorded routing (routing replay), or None when the engine sent none."""
    routing = [s.routed_experts for s in samples]
    return routing if any(r is not None for r in routing) else None


def greedy_accuracy(engine, pool, items, max_new_tokens: int) -> dict[str, float]:
    """Held-out greedy accuracy and format rate (one response per prompt, temperature 0)."""
    prompts = [it.prompt for it in items]
    samples = engine.generate(prompts, 1, SamplingParams(temperature=0.0,
                                                         max_new_tokens=max_new_tokens))
    scored = pool.score([s.text for s in samples], [it.answer for it in items],
                        [it.meta for it in items])
    return {"eval/accuracy": mean(scored.scores.get("accuracy", [])),
            "eval/format": mean(scored.scores.get("format", [])),
            "eval/response_length": mean(len(s.token_ids) for s in samples)}
