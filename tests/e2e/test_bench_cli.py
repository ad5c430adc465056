"""`eureka-megatron bench` as a user runs it: progress on stderr, the table on stdout, JSON."""
import json
import subprocess
import sys

import pytest


def test_bench_rollout_quick_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "eureka_megatron.cli", "bench", "rollout", "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[bench 1/1] rollout --quick" in r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| what"))
    assert [c.strip() for c in header.strip("|").split("|")][:5] == [
        "what", "size", "time (s)", "throughput", "% of bound"]
    (row,) = json.loads(out.read_text())["rollout"]["rows"]
    assert row["generated tokens"] == 4 * 8 * 32  # --quick: 4 prompts x 8 samples x 32 tokens
    assert row["throughput/unit"] == "tokens/s"
    assert row["throughput/value"] == row["generated tokens"] / row["time (s)"]
    assert 0 < row["% of bound"]
    assert f"| {row['throughput']} |" in r.stdout


@pytest.mark.slow
def test_bench_demo_times_each_seed_from_the_command_start(tmp_path):
    """A few demo steps per seed through `bench demo`: each row is what that run's own
    metrics.jsonl says (accuracy at the evals, wall time of the eval lines from the start)."""
    out, runs = tmp_path / "bench.json", tmp_path / "runs"
    short = ["warmup.steps=4", "train.steps=4", "eval.interval=2", "eval.size=8",
             "data.synthetic_size=64", "train.rollout_batch_size=4", "algo.online_filter=false"]
    r = subprocess.run([sys.executable, "-m", "eureka_megatron.cli", "bench", "demo", "--seeds",
                        "5,6", "--runs", str(runs), "--out", str(out), *short],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["demo"]["rows"]
    assert [row["seed"] for row in rows] == [5, 6]
    for row in rows:
        metrics = [json.loads(x) for x in (runs / f"seed_{row['seed']}" / "metrics.jsonl")
                   .read_text().splitlines()]
        evals = [m["eval/accuracy"] for m in metrics if m.get("eval/accuracy") is not None]
        assert len(evals) == 3 and row["final"] == evals[-1] and row["best"] == max(evals)
        assert row["steps"] == 4 and row["collapsed"] == (evals[-1] < max(evals) - 0.05)
        steps = sorted(m["time/step_s"] for m in metrics if "time/step_s" in m)
        assert row["s/step"] == (steps[1] + steps[2]) / 2
        assert 0 < row["train"] < row["s/step"] and 0 < row["generate"] < row["s/step"]
        assert 0 < metrics[-1]["time/unix_s"] - metrics[0]["time/unix_s"] < row["time (s)"]
        assert f"| demo seed {row['seed']} |" in r.stdout
    with_cut = subprocess.run([sys.executable, "-m", "eureka_megatron.cli", "bench", "step",
                               "--seeds", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert with_cut.returncode != 0 and "options of `bench demo`" in with_cut.stderr
