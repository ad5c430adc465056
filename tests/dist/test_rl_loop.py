"""The RL loop end to end on gloo ranks with the demo's tiny Qwen2.5-VL: real Megatron actor, HF
engine, weight sync, reward pool, synthetic data.

- The same first rollout batch trains to the same loss at TP1, TP2 and PP2, and the first step's
  policy ratio is exactly 1 and its KL to the reference exactly 0 (mini-batches force the old /
  reference log-prob passes); the engine samples with the trainer's weights (log-probs agree).
- A run stopped after a checkpoint and resumed reproduces the uninterrupted run's metrics.
- An engine that dies mid-generation is restarted, resynced, and the run goes on.
- Bad JSONL rows are skipped and counted; off-policy mode trains on one-step-stale batches.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint
from eureka_megatron.trainer.loop import run_rl

TIMING = ("time/", "tokens_per_s")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


def small_config(out: Path, hf: Path, *extra: str):
    return demo_config(out, [f"model.hf={hf}", "warmup.steps=0", "train.steps=2",
                             "train.rollout_batch_size=4", "rollout.n_samples=4",
                             "rollout.max_new_tokens=6", "algo.online_filter=false",
                             "eval.interval=2", "eval.size=8", "data.synthetic_size=64",
                             "output.progress=false", "output.hf_export=false",
                             "rewards.num_workers=1", *extra])


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if not k.startswith(TIMING)}


def run(cfg, nproc=1, **kw):
    return launch(run_rl, nproc, cfg, timeout=600, **kw)[0]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_layouts_agree_and_first_step_invariants(tmp_path, tiny_hf, layout):
    common = ("train.mini_batches=2", "algo.kl_coef=0.1", "algo.kl_in=loss", "train.steps=1",
              "eval.interval=0")
    ref = run(small_config(tmp_path / "tp1", tiny_hf, *common))
    par = {"tp2": ["parallel.tensor_parallel=2"], "pp2": ["parallel.pipeline_parallel=2"]}[layout]
    cfg = small_config(tmp_path / layout, tiny_hf, *common, "parallel.nproc=2", *par)
    got = run(cfg, nproc=2)
    a, b = ref[-1], got[-1]
    for h in (a, b):
        assert h["first/ratio_min"] == 1.0 and h["first/ratio_max"] == 1.0
        assert h["first/kl"] == 0.0
        assert h["rollout/logprob_abs_diff_max"] < 1e-4
        assert h["weight_version"] == 1.0
    # same weights and seed -> the same samples and rewards; the same loss at any layout
    assert a["rewards/total"] == b["rewards/total"]
    assert a["advantages/abs_mean"] == pytest.approx(b["advantages/abs_mean"], abs=1e-9)
    assert a["train/loss"] == pytest.approx(b["train/loss"], abs=2e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
    assert (Path(cfg.output.dir) / "metrics.jsonl").is_file()


@pytest.mark.parametrize("async_save", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["sync", "async"])
def test_resume_after_stop_reproduces_metrics(tmp_path, tiny_hf, async_save):
    """(async: the stopped run and the resumed one save with checkpoint.async_save; the
    uninterrupted run saves synchronously.)"""
    extra = ("train.steps=4", "checkpoint.save_interval=2", "eval.interval=2")
    full = run(small_config(tmp_path / "full", tiny_hf, *extra))
    mode = ["checkpoint.async_save=true"] if async_save else []
    cut_cfg = small_config(tmp_path / "cut", tiny_hf, *extra, *mode)
    first = run(cut_cfg, stop_after=3)  # "killed" after step 3; the last checkpoint is step 2
    assert [h["step"] for h in first] == [0, 1, 2, 3]
    resumed = run(small_config(tmp_path / "cut", tiny_hf, *extra, *mode,
                               f"checkpoint.load={tmp_path / 'cut' / 'checkpoints'}"))
    assert [h["step"] for h in resumed] == [3, 4]
    for want, got in zip(full[-2:], resumed):
        w, g = comparable(want), comparable(got)
        assert w.keys() == g.keys()
        for k in w:
            if isinstance(w[k], float) and math.isnan(w[k]):
                assert math.isnan(g[k]), k
            else:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), k
    lines = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3, 4]  # the killed run's step 3 was replaced


class DiesOnce:
    """Wraps an engine; its 2nd generate call raises as if the server crashed mid-request."""

    def __init__(self, engine):
        self.engine, self.calls, self.restarts = engine, 0, 0

    def generate(self, prompts, n, sampling):
        self.calls += 1
        if self.calls == 2:
            raise ConnectionError("engine died mid-generation")
        return self.engine.generate(prompts, n, sampling)

    def restart(self):
        self.restarts += 1
        self.engine.restart()

    def __getattr__(self, name):
        return getattr(self.engine, name)


def dies_once(engine):
    return DiesOnce(engine)


def test_engine_failure_mid_run_is_survived(tmp_path, tiny_hf):
    cfg = small_config(tmp_path / "run", tiny_hf, "train.steps=3", "eval.interval=0")
    hist = run(cfg, wrap_engine=dies_once)
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert hist[0]["rollout/engine_restarts"] == 0.0
    assert hist[-1]["rollout/engine_restarts"] == 1.0
    assert [h["rollout/weight_version"] for h in hist] == [0.0, 1.0, 2.0]
    # after the restart the engine was resynced: it samples with the trained weights again
    assert hist[-1]["rollout/logprob_abs_diff_max"] < 1e-4


def test_bad_rows_are_skipped_and_counted(tmp_path, tiny_hf):
    from eureka_megatron.data.synthetic import synthetic_dataset, write_jsonl

    d = write_jsonl(synthetic_dataset(12, "train", seed=3, tasks=["count_circles"]),
                    tmp_path / "d").parent
    rows = (d / "data.jsonl").read_text().splitlines()
    (d / "broken.png").write_bytes(b"not a png")
    bad = ['{"question": "no answer", "images": []}', "{not json",
           json.dumps({"question": "q", "answer": "1", "images": ["missing.png"]}),
           json.dumps({"question": "How many circles are in the image?", "answer": "2",
                       "images": ["broken.png"]})]
    (d / "data.jsonl").write_text("\n".join(rows[:6] + bad + rows[6:]) + "\n")
    cfg = small_config(tmp_path / "run", tiny_hf, f"data.train={d}", "train.steps=2",
                       "eval.interval=0", "train.rollout_batch_size=8")
    hist = run(cfg)
    assert [h["step"] for h in hist] == [1, 2]
    # 3 rows refused when loading, the corrupt image when its prompt is built
    assert hist[-1]["data/skipped_rows"] == 4.0


def test_off_policy_mode_trains(tmp_path, tiny_hf):
    cfg = small_config(tmp_path / "run", tiny_hf, "train.mode=off-policy", "train.steps=3",
                       "eval.interval=0")
    hist = run(cfg)
    assert [h["step"] for h in hist] == [1, 2, 3]
    for h in hist:
        assert h["first/ratio_max"] == 1.0 and math.isfinite(h["train/loss"])
    # step t trains on a batch sampled while step t-1 trained: with weights t-2 (the first with 0)
    assert [h["rollout/weight_version"] for h in hist] == [0.0, 0.0, 1.0]
    assert [h["weight_version"] for h in hist] == [1.0, 2.0, 3.0]
    assert torch.isfinite(torch.tensor(hist[-1]["grad_norm"]))


def test_on_policy_samples_with_the_latest_weights(tmp_path, tiny_hf):
    hist = run(small_config(tmp_path / "run", tiny_hf, "train.steps=2", "eval.interval=0"))
    assert [h["rollout/weight_version"] for h in hist] == [0.0, 1.0]


def test_kl_in_reward_with_one_pass_and_token_whitened_reinforce_pp(tmp_path, tiny_hf):
    """kl_in=reward at the default mini_batches = epochs = 1: the penalty needs the old log-probs,
    which the one-pass loss does not; reinforce++ whitens over the batch's tokens; token-level
    rollout importance sampling runs and the mismatch metrics are logged."""
    hist = run(small_config(tmp_path / "run", tiny_hf, "algo.kl_in=reward", "algo.kl_coef=0.1",
                            "algo.estimator=reinforce++", "eval.interval=0",
                            "rewards.functions=[tests.unit.reward_fns:parity_judge]",
                            "algo.rollout_is=token"))
    assert [h["step"] for h in hist] == [1, 2]
    first, second = hist
    assert first["kl/reward_penalty"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert second["kl/reward_penalty"] > 0  # one update later they differ
    for h in hist:
        assert math.isfinite(h["train/loss"]) and h["grad_norm"] > 0  # rewards vary: it trains
        # the mismatch metrics (fp32 engine and trainer agree to rounding on a CPU)
        assert 0 <= h["rollout/k3_kl"] < 1e-6 and h["rollout/beyond_is_cap"] == 0.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert all("rollout/k3_kl" in rec for rec in logged)


def test_run_from_a_megatron_checkpoint_matches_the_hf_start(tmp_path, tiny_hf):
    """`model.megatron=DIR` (ranks read their own shards; the engine starts empty and gets the
    first sync) gives the same first step as the HF checkpoint it was converted from, at TP2."""
    from eureka_megatron.convert.run import hf_to_megatron

    hf_to_megatron(tiny_hf, tmp_path / "meg", progress=False)
    common = ("train.steps=1", "eval.interval=0", "algo.kl_coef=0.1", "parallel.nproc=2",
              "parallel.tensor_parallel=2", "output.hf_export=true")
    ref = run(small_config(tmp_path / "from_hf", tiny_hf, *common), nproc=2)
    cfg = small_config(tmp_path / "from_meg", tiny_hf, *common, "model.hf=null",
                       f"model.megatron={tmp_path / 'meg'}")
    got = run(cfg, nproc=2)
    nan_free = [{k: "nan" if isinstance(v, float) and math.isnan(v) else v
                 for k, v in comparable(h[-1]).items()} for h in (got, ref)]
    assert nan_free[0] == nan_free[1]
    assert got[-1]["first/kl"] == 0.0 and got[-1]["rollout/logprob_abs_diff_max"] < 1e-4
    a, b = tmp_path / "from_hf" / "hf_final", tmp_path / "from_meg" / "hf_final"
    from eureka_megatron.convert.hf_io import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    assert ca.names == cb.names
    for name in sorted(ca.names):
        assert torch.equal(ca.get(name), cb.get(name)), name
