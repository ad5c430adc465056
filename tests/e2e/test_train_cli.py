"""`eureka-megatron train` / `demo` as a user runs them: dry runs, errors before any rank starts,
and a run killed with SIGKILL that `--resume` finishes with the uninterrupted run's metrics."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eureka_megatron.trainer.demo import write_tiny_checkpoint

CLI = [sys.executable, "-m", "eureka_megatron.cli"]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DEMO = str(EXAMPLES / "demo_cpu.yaml")
TIMING = ("time/", "tokens_per_s")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "hf", seed=0)


def small(out, hf, *extra):
    return [DEMO, f"model.hf={hf}", f"output.dir={out}", "warmup.steps=0", "train.steps=4",
            "train.rollout_batch_size=4", "rollout.n_samples=4", "rollout.max_new_tokens=6",
            "algo.online_filter=false", "eval.interval=2", "eval.size=8",
            "data.synthetic_size=64", "output.hf_export=false", "rewards.num_workers=1",
            "checkpoint.save_interval=1", "checkpoint.keep_last=2", *extra]


def cli(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_train_and_demo():
    r = cli("--help")
    assert r.returncode == 0 and "train" in r.stdout and "demo" in r.stdout
    r = cli("train", "--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--resume" in r.stdout


@pytest.mark.parametrize("name", ["qwen2_5_vl_7b", "qwen2_5_vl_32b", "internvl2_5_38b"])
def test_cluster_recipes_validate(name, tmp_path):
    """The recipes load and validate (the model directory itself is checked separately)."""
    from eureka_megatron.config import load_rl_config

    cfg = load_rl_config(EXAMPLES / f"{name}.yaml", [f"model.hf={tmp_path}"])
    assert cfg.parallel.nproc % (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel) == 0
    assert cfg.cluster.launcher == "ray" and cfg.rollout.engine == "sglang"


def test_dry_run_prints_layout_and_trains_nothing(tmp_path, tiny_hf):
    r = cli("train", *small(tmp_path / "run", tiny_hf, "parallel.tensor_parallel=2",
                            "parallel.nproc=2"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "TP2 x PP1 x DP1 = 2 ranks" in r.stdout and "4 prompts x 4 = 16 sequences" in r.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    (["parallel.tensor_parallel=8", "parallel.nproc=8"], "num_attention_heads=4"),
    (["train.mode=async"], "train.mode='async'"),
    (["rollout.n_samples=1"], "rollout.n_samples=1"),
    (["train.rollout_batch_size=4", "train.mini_batches=3"], "train.mini_batches=3"),
    (["algo.loss=dpo"], "algo.loss"),
    (["rollout.temprature=0.7"], "unknown config key rollout.temprature"),
])
def test_bad_config_fails_before_ranks_start(tmp_path, tiny_hf, extra, message):
    r = cli("train", *small(tmp_path / "run", tiny_hf, *extra), "--dry-run")
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_missing_model_directory_is_named(tmp_path):
    r = cli("train", DEMO, f"model.hf={tmp_path / 'nope'}", f"output.dir={tmp_path}")
    assert r.returncode == 2 and "nope" in r.stderr


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_hf):
    full = cli("train", *small(tmp_path / "full", tiny_hf), timeout=600)
    assert full.returncode == 0, full.stderr
    assert "held-out greedy accuracy" in full.stdout
    for f in ("summary.md", "reward.png", "accuracy.png"):
        assert (tmp_path / "full" / f).is_file(), f

    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([*CLI, "train", *small(run_dir, tiny_hf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() >= "step_00000002"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer ranks and reward workers die with it
    proc.wait()
    killed_at = latest.read_text().strip()
    assert killed_at < "step_00000004", "the run finished before the kill"

    resumed = cli("train", *small(run_dir, tiny_hf), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    want, got = _metrics(tmp_path / "full"), _metrics(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 1, 2, 3, 4]
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k, v in w.items():
            if v is None:
                assert g[k] is None, k
            else:
                assert g[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (w["step"], k)


def test_ray_launcher_runs_the_loop_at_tp2(tmp_path, tiny_hf):
    """`cluster.launcher=ray`: the ranks are Ray actors in a placement group (Ray local here)."""
    out = tmp_path / "ray"
    r = cli("train", *small(out, tiny_hf, "train.steps=1", "eval.interval=0",
                            "cluster.launcher=ray", "parallel.nproc=2",
                            "parallel.tensor_parallel=2"), timeout=600)
    assert r.returncode == 0, r.stderr
    (rec,) = _metrics(out)
    assert rec["step"] == 1 and rec["first/ratio_max"] == 1.0 and rec["weight_version"] == 1.0
