"""The rollout collector's online-filter rounds, with the real reward pool and a scripted engine
(which responses come out is the test's input, so the filter's decisions can be checked)."""
import logging

import pytest

from eureka_megatron.config import load_rl_config
from eureka_megatron.data.dataset import PromptItem
from eureka_megatron.rewards.pool import RewardPool
from eureka_megatron.rollout.engine import Prompt, Sample
from eureka_megatron.trainer.collect import Collector

FNS = "tests.unit.reward_fns"
N = 4


class ScriptedEngine:
    """Prompt k's j-th response is "yes" for j < right[k], else "no" (answers are "yes")."""

    def __init__(self, right):
        self.right, self.asked = right, []

    def generate(self, prompts, n, sampling):
        self.asked.append(len(prompts))
        return [Sample(i, [1], "yes" if j < self.right[p.input_ids[0]] else "no", [0.0], "stop", 0)
                for i, p in enumerate(prompts) for j in range(n)]


class Stream:
    def __init__(self):
        self.next, self.skipped = 0, 0

    def next_batch(self, k):
        items = [PromptItem(Prompt(input_ids=[self.next + i]), "yes", f"r{self.next + i}", "t")
                 for i in range(k)]
        self.next += k
        return items


def collector(right, functions, weights=None, **extra):
    cfg = load_rl_config(None, ["model.hf=ckpt", "train.rollout_batch_size=4",
                                f"rollout.n_samples={N}", "rollout.max_filter_rounds=6",
                                *[f"{k}={v}" for k, v in extra.items()]])
    pool = RewardPool(functions, weights=weights or {"accuracy": 1.0}, num_workers=1)
    return Collector(cfg, ScriptedEngine(right), pool, Stream()), pool


def test_rounds_sample_only_what_the_keep_rate_needs():
    # every other prompt passes (2 of 4 right); prompt 1000+ never asked for
    right = {k: (2 if k % 2 == 0 else 0) for k in range(1000)}
    c, pool = collector(right, [f"{FNS}:toy_scores"])
    with pool:
        batch = c.collect(step=1)
        assert c.engine.asked[0] == 4  # a full batch first
        assert c.engine.asked[1] == 4  # 2 missing at keep rate 1/2
        assert len(batch.groups) == 4 and batch.metrics["filter/underfull"] == 0.0
        assert [g.accuracy for g in batch.groups] == [[1.0, 1.0, 0.0, 0.0]] * 4
        c.engine.asked.clear()
        right.update({k: 2 for k in range(8, 1000)})  # from here on everything passes
        right.update({8: 0})  # ... but the first prompt of the next step
        c.collect(step=2)
    assert c.engine.asked == [4, 2]  # 3 of 4 kept: 1 missing / 0.75 -> 2 prompts, not 4


def test_without_an_accuracy_score_the_filter_is_skipped_with_one_warning(caplog):
    c, pool = collector({k: 0 for k in range(100)}, [f"{FNS}:length"], {"length": 1.0})
    with pool, caplog.at_level(logging.WARNING):
        first = c.collect(step=1)
        second = c.collect(step=2)
    assert len(first.groups) == len(second.groups) == 4  # not silently filtered to nothing
    warnings = [r for r in caplog.records if "no 'accuracy' score" in r.getMessage()]
    assert len(warnings) == 1 and "['length']" in warnings[0].getMessage()


@pytest.mark.parametrize("right,kept", [(3, 4), (4, 0)])
def test_all_right_groups_never_pass(right, kept):
    c, pool = collector({k: right for k in range(100)}, [f"{FNS}:toy_scores"],
                        **{"rollout.max_filter_rounds": 2})
    with pool:
        assert len(c.collect(step=1).groups) == kept
