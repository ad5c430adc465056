"""The command line as a user runs it: help, dry runs, clear errors before ranks start, training."""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "eureka_megatron.cli"]
TINY = str(Path(__file__).resolve().parents[2] / "examples" / "tiny_lm.yaml")


def run(*args, timeout=300):
    """The CLI from a scratch working directory (the example writes runs/ relative to it)."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_help():
    r = run("--help")
    assert r.returncode == 0
    assert "train-lm" in r.stdout and "bench" in r.stdout
    r = run("train-lm", "--help")
    assert r.returncode == 0 and "--dry-run" in r.stdout and "--nproc" in r.stdout


def test_dry_run_prints_layout():
    r = run("train-lm", TINY, "parallel.tensor_parallel=2",
            "parallel.pipeline_parallel=2", "--nproc", "4", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "TP2 x PP2 x DP1 = 4 ranks" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["parallel.tensor_parallel=2", "--nproc", "3"], "not divisible by TP*PP"),
    (["parallel.tensor_parallel=8", "--nproc", "8"], "num_attention_heads"),
    (["model.num_hidden_layers=3", "parallel.pipeline_parallel=2", "--nproc", "2"], "num_hidden_layers=3"),
    (["checkpoint.load=/nonexistent/run"], "checkpoint path does not exist: /nonexistent/run"),
])
def test_bad_input_fails_before_ranks(args, message):
    t0 = time.monotonic()
    r = run("train-lm", TINY, *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30  # no ranks were started, nothing waited on a collective


def test_train_then_resume(tmp_path):
    r = run("train-lm", TINY, "train.steps=2", f"checkpoint.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "step     2/2" in r.stdout and (tmp_path / "step_00000002" / "complete.json").is_file()
    r = run("train-lm", TINY, "train.steps=3", f"checkpoint.dir={tmp_path}",
            f"checkpoint.load={tmp_path}", "parallel.tensor_parallel=2", "--nproc", "2")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "step     3/3" in r.stdout
    assert "step     1/" not in r.stdout
    # A fresh run into a used directory would interleave with (and prune) its checkpoints.
    r = run("train-lm", TINY, f"checkpoint.dir={tmp_path}")
    assert r.returncode == 2 and "already holds checkpoints (latest: step_00000003)" in r.stderr
