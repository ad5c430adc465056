"""`eureka-megatron bench` as a user runs it: progress on stderr, the table on stdout, JSON."""
import json
import subprocess
import sys


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
