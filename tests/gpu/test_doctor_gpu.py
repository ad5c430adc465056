"""`eureka-megatron doctor` at the GPU sizes: what a lent GPU runs first. Every row ok or skipped
with its reason, and the GPU-only rows really measured (compiled kernels, kernel speed at the
issue's shapes, the bf16 train step, the bf16 sync)."""
import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_doctor_at_gpu_sizes(tmp_path):
    out = tmp_path / "doctor.json"
    r = subprocess.run([sys.executable, "-m", "eureka_megatron.cli", "doctor", "--out", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["doctor"]["rows"]
    assert all(x["status"] in ("ok", "skipped") for x in rows), rows
    by = {x["check"]: x for x in rows}
    assert by["CUDA"]["status"] == by["NCCL"]["status"] == "ok"
    assert "compiled" in by["logprob_entropy bf16"]["note"]
    speed = [x for x in rows if x["group"] == "kernel speed" and x["status"] == "ok"]
    assert {x["bench_row"]["T x H x V"] for x in speed} == {"16384 x 5120 x 152064",
                                                           "16384 x 5120 x 19008"}
    assert by["megatron train step bf16"]["tokens_per_s"] > 0
    assert by["megatron -> hf engine, bf16"]["version"] == 1
