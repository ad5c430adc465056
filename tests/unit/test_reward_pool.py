"""RewardPool with real worker processes: order, weights, timeouts, crashes, errors, clean-up."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from eureka_megatron.rewards.pool import RewardPool
from tests.unit import reward_fns

FNS = "tests.unit.reward_fns"
TOWER = "9^{9^{9^{9^{9}}}}"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def pool():
    """One pool for the misbehaviour tests: it must keep serving after every one of them."""
    with RewardPool([f"{FNS}:behave"], weights={"unique": 1.0}, num_workers=2, timeout=1.0,
                    memoize=False) as p:
        yield p


def _unique(responses, answers):
    return [reward_fns.behave(r, a, None)["unique"] for r, a in zip(responses, answers)]


def test_results_in_order_with_default_weights():
    responses = [("<t>" if i % 3 else "") + ("x" * (i % 7)) for i in range(40)]
    answers = ["<t>xx" if i % 2 else "xxx" for i in range(40)]
    with RewardPool([f"{FNS}:toy_scores", f"{FNS}:length"], num_workers=2) as p:
        r = p.score(responses, answers)
    want = [reward_fns.toy_scores(x, a, None) for x, a in zip(responses, answers)]
    assert r.scores["accuracy"] == [w["accuracy"] for w in want]
    assert r.scores["format"] == [w["format"] for w in want]
    assert r.scores["length"] == [float(len(x)) for x in responses]  # unweighted, still reported
    assert r.total == [w["accuracy"] + 0.5 * w["format"] for w in want]
    assert 0 < sum(r.scores["accuracy"]) < 40 and 0 < sum(r.scores["format"]) < 40
    assert r.counters == {"reward/timeouts": 0, "reward/errors": 0, "reward/worker_restarts": 0}


def test_custom_weights_and_extra_function():
    responses, answers = ["<a>", "<a>bc", "d", "<a>"], ["<a>", "x", "d", "y"]
    with RewardPool([f"{FNS}:toy_scores", f"{FNS}:length"],
                    weights={"accuracy": 2.0, "length": 0.25}, num_workers=1) as p:
        r = p.score(responses, answers, metas=[{}] * 4)
    assert r.total == pytest.approx([2.0 + 0.75, 1.25, 2.0 + 0.25, 0.75])
    assert r.scores["format"] == [1.0, 1.0, 0.0, 1.0]  # weight 0, still reported


def test_empty_batch_and_mismatched_lengths(pool):
    r = pool.score([], [])
    assert r.total == [] and r.scores["unique"] == []
    with pytest.raises(ValueError, match="3 responses, 2 answers"):
        pool.score(["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="1 metas"):
        pool.score(["a", "b"], ["a", "b"], metas=[{}])


def test_unpicklable_meta_is_a_clear_error(pool):
    with pytest.raises(TypeError, match="reward sample 1 cannot be sent"):
        pool.score(["a", "b"], ["a", "b"], metas=[{}, {"lock": threading.Lock()}])
    assert pool.score(["a", "bb"], ["a", "x"]).total == [1001.0, 2.0]


def test_timeouts_score_zero_and_pool_keeps_serving(pool):
    responses = ["SLEEP", "a", "SPIN", "bb", "SLEEP", "ccc", "dddd"]
    answers = ["x", "a", "x", "x", "x", "x", "dddd"]
    old_pids = pool.pids
    t0 = time.monotonic()
    r = pool.score(responses, answers)
    wall = time.monotonic() - t0
    assert r.counters["reward/timeouts"] == 3 and r.counters["reward/errors"] == 0
    assert r.counters["reward/worker_restarts"] == 3
    assert r.total == [0.0, 1001.0, 0.0, 2.0, 0.0, 3.0, 1004.0]
    assert wall < 10.0, wall  # 3 timeouts of 1 s over 2 workers, plus restarts
    assert all(_gone(pid) for pid in old_pids if pid not in pool.pids)  # hung workers were killed
    again = ["e", "ff", "ggg"]
    r = pool.score(again, ["e", "x", "x"])
    assert r.total == _unique(again, ["e", "x", "x"]) and r.counters["reward/timeouts"] == 0


def test_crash_is_retried_then_scored_zero_without_misattribution(pool):
    responses = ["a" * k for k in range(1, 12)]
    responses[3] = "CRASH"
    answers = list(responses)
    answers[5] = "other"
    r = pool.score(responses, answers)
    want = _unique(responses[:3], answers[:3]) + [0.0] + _unique(responses[4:], answers[4:])
    assert r.total == want and r.scores["unique"] == want
    assert r.counters == {"reward/timeouts": 0, "reward/errors": 1, "reward/worker_restarts": 2}


def test_crash_once_gets_its_real_score_on_retry(pool, tmp_path):
    responses = ["a", "CRASH_ONCE", "bbb"]
    metas = [{}, {"marker": str(tmp_path / "crashed")}, {}]
    r = pool.score(responses, ["a", "CRASH_ONCE", "x"], metas)
    assert (tmp_path / "crashed").exists()
    assert r.total == [1001.0, 1010.0, 3.0]
    assert r.counters == {"reward/timeouts": 0, "reward/errors": 0, "reward/worker_restarts": 1}


def test_function_exception_scores_zero_and_warns(pool, caplog):
    responses = ["a", "RAISE", "cc", "RAISE"]
    with caplog.at_level(logging.WARNING, logger="eureka_megatron.rewards.pool"):
        r = pool.score(responses, ["a", "x", "x", "x"])
    assert r.total == [1001.0, 0.0, 2.0, 0.0]
    assert r.counters == {"reward/timeouts": 0, "reward/errors": 2, "reward/worker_restarts": 0}
    warnings = [rec.getMessage() for rec in caplog.records]
    assert len(warnings) == 1 and "sample 1" in warnings[0] and "ValueError: boom" in warnings[0]


def test_bad_return_value_is_an_error():
    with RewardPool([f"{FNS}:bad_return"], weights={}, num_workers=1) as p:
        r = p.score(["a"], ["a"])
    assert r.total == [0.0] and r.counters["reward/errors"] == 1


@pytest.mark.parametrize("spec, match", [
    ("no_colon", "expected 'module:function'"),
    (f"{FNS}:a:b", "expected 'module:function'"),
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' not found"),
    (f"{FNS}:missing", "has no attribute 'missing'"),
    (f"{FNS}:NOT_CALLABLE", "is not callable"),
])
def test_bad_function_strings(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        RewardPool([f"{FNS}:length", spec])
    assert spec in str(e.value)


def test_bad_weight_name_and_duplicate_score_name():
    with RewardPool([f"{FNS}:toy_scores"], weights={"acuracy": 1.0}, num_workers=1) as p:
        with pytest.raises(ValueError, match=r"\['acuracy'\].*produce \['accuracy', 'format'\]"):
            p.score(["a"], ["a"])
    with RewardPool([f"{FNS}:length", f"{FNS}:toy_scores", f"{FNS}:behave"], weights={},
                    num_workers=1) as p:
        assert p.score(["a"], ["a"]).scores["length"] == [1.0]  # distinct names combine
    with pytest.raises(ValueError, match="weight 'x'"):
        RewardPool([f"{FNS}:length"], weights={"x": float("nan")})


def test_start_up_does_not_count_against_the_timeout(monkeypatch, tmp_path):
    """A replacement that imports for 1.5 s still gives the retried sample its full 0.5 s."""
    monkeypatch.setenv("REWARD_FNS_IMPORT_DELAY", "1.5")  # read by each worker's import
    with RewardPool([f"{FNS}:behave"], weights={}, num_workers=1, timeout=0.5) as p:
        r = p.score(["a", "CRASH_ONCE", "bb"], ["a", "CRASH_ONCE", "x"],
                    [{}, {"marker": str(tmp_path / "crashed")}, {}])
    assert r.scores["unique"] == [1001.0, 1010.0, 2.0]
    assert r.counters == {"reward/timeouts": 0, "reward/errors": 0, "reward/worker_restarts": 1}


def test_pathological_power_times_out_and_pool_keeps_serving():
    with RewardPool([f"{FNS}:mv_accuracy"], weights={"accuracy": 1.0}, num_workers=1,
                    timeout=2.0) as p:
        t0 = time.monotonic()
        r = p.score([r"<answer>$9^{9^{9^{9^{9}}}}$</answer>"], ["1"])
        assert time.monotonic() - t0 < 4.0
        assert r.total == [0.0] and r.counters["reward/timeouts"] == 1
        r = p.score([r"<answer>$0.5$</answer>", r"<answer>$\sqrt{18}$</answer>"],
                    [r"\frac{1}{2}", r"3\sqrt{2}"])
        assert r.total == [1.0, 1.0] and r.counters["reward/timeouts"] == 0


def test_no_processes_left_after_close():
    p = RewardPool([f"{FNS}:behave"], weights={}, num_workers=2, timeout=1.0)
    first = p.pids
    assert p.score(["CRASH", "a"], ["", ""]).counters["reward/worker_restarts"] == 2
    pids = set(first + p.pids)
    p.close()
    p.close()  # idempotent
    assert len(pids) >= 3 and all(_gone(pid) for pid in pids)  # the retry may land on either
    with pytest.raises(RuntimeError, match="closed"):
        p.score(["a"], ["a"])


def test_real_rule_based_scores_in_order_with_default_weights():
    from eureka_megatron.bench.rewards import make_mix
    from eureka_megatron.rewards import rule_based_scores

    responses, answers = make_mix(40, seed=3, pathological=False)
    with RewardPool(num_workers=2) as p:  # rule_based_scores, accuracy + 0.5 x format
        r = p.score(responses, answers)
    want = [rule_based_scores(x, a, None) for x, a in zip(responses, answers)]
    assert r.scores["accuracy"] == [w["accuracy"] for w in want]
    assert r.scores["format"] == [w["format"] for w in want]
    assert r.total == [w["accuracy"] + 0.5 * w["format"] for w in want]
    assert {0.5, 1.0, 1.5} <= set(r.total)  # right and wrong, tagged and boxed-only
    assert r.counters == {"reward/timeouts": 0, "reward/errors": 0, "reward/worker_restarts": 0}


def test_real_rewards_tower_answer_is_zero_within_the_timeout():
    with RewardPool(num_workers=1, timeout=2.0) as p:
        t0 = time.monotonic()
        r = p.score([f"<answer>{TOWER}</answer>", f"<think>t</think><answer>${TOWER}$</answer>"],
                    ["1", "1"])
        assert time.monotonic() - t0 < 2 * 2.0 + 2.0
        assert r.scores["accuracy"] == [0.0, 0.0] and r.total[0] == 0.0
        r = p.score([r"<think>t</think><answer>$0.5$</answer>", r"<answer>$\sqrt{18}$</answer>"],
                    [r"\frac{1}{2}", r"3\sqrt{2}"])
        assert r.total == [1.5, 1.0] and r.counters["reward/timeouts"] == 0


def test_memo_scores_each_distinct_triple_once(tmp_path):
    log = tmp_path / "calls.txt"
    meta = {"log": str(log)}
    responses = ["a", "bb", "a", "a", "ccc", "bb", "a"]
    answers = ["a", "x", "a", "x", "x", "x", "a"]
    with RewardPool([f"{FNS}:logged"], weights={"unique": 1.0}, num_workers=2) as p:
        r = p.score(responses, answers, [meta] * len(responses))
        assert r.total == _unique(responses, answers)
        calls = log.read_text().splitlines()
        assert sorted(calls) == sorted({f"{x}|{a}" for x, a in zip(responses, answers)})
        again = p.score(["bb", "a", "dddd"], ["x", "a", "x"], [meta] * 3)  # remembered across calls
        assert again.total == _unique(["bb", "a", "dddd"], ["x", "a", "x"])
        assert log.read_text().splitlines()[len(calls):] == ["dddd|x"]
        other = p.score(["a"], ["a"], [{"log": str(log), "k": 1}])  # another meta: scored again
        assert other.total == [1001.0] and log.read_text().splitlines()[-1] == "a|a"


def test_memo_copies_of_a_timeout_count_per_sample_and_are_not_remembered():
    with RewardPool([f"{FNS}:behave"], weights={"unique": 1.0}, num_workers=2, timeout=1.0) as p:
        t0 = time.monotonic()
        r = p.score(["SLEEP", "a", "SLEEP"], ["x", "a", "x"])
        assert time.monotonic() - t0 < 5.0
        assert r.total == [0.0, 1001.0, 0.0]
        assert r.counters == {"reward/timeouts": 2, "reward/errors": 0, "reward/worker_restarts": 1}
        r = p.score(["SLEEP"], ["x"])
        assert r.counters["reward/timeouts"] == 1  # a timeout is tried again, never remembered
        r = p.score(["RAISE", "RAISE"], ["x", "x"])
        assert r.total == [0.0, 0.0] and r.counters["reward/errors"] == 2
