"""`bench step --quick` on the demo model (gloo ranks): the time split of one real RL step."""
import contextlib
import io
import json

import pytest

from eureka_megatron.bench import run_bench

PARTS = ["rollout: engine.generate", "rewards: pool.score", "old log-probs (+ planning, advantages)",
         "train (fwd + bwd + optimizer)", "weight sync -> engine"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_bench("step", quick=True, out=out) == 0
    return json.loads(out.read_text())["step"]["rows"], printed.getvalue()


@pytest.fixture
def step_run(bench):
    return [r for r in bench[0] if "% of step" in r]


@pytest.fixture
def padding(bench):
    return {r["what"]: r for r in bench[0] if r["what"].startswith("padding efficiency")}


def test_split_tokens_per_s_and_mfu(step_run):
    rows = {r["what"]: r for r in step_run}
    step = step_run[0]
    assert step["what"] == "RL step (all of it)" and step["step"] == 2  # the 2nd (last) step
    total = step["time (s)"]
    parts = [rows[p]["time (s)"] for p in PARTS]
    assert all(p > 0 for p in parts)
    assert sum(parts) <= total + 1e-6
    other = rows["other (batching, broadcasts, metrics)"]["time (s)"]
    assert other >= -1e-6 and sum(parts) + other == pytest.approx(total)
    assert sum(r["% of step"] for r in step_run[1:]) == pytest.approx(100.0)
    # tokens/s is the loop's own: trained tokens / step time
    assert step["throughput/value"] == pytest.approx(step["trained tokens"] / total)
    assert step["throughput/value"] == pytest.approx(step["loop tokens_per_s"])
    # 8 prompts x 8 samples, 12 new tokens at most; trained tokens include the prompts
    assert 0 < step["generated tokens"] <= 8 * 8 * 12 < step["trained tokens"]
    assert 0 < step["% of bound"] <= 100  # MFU
    train = rows["train (fwd + bwd + optimizer)"]
    assert train["throughput/value"] == pytest.approx(step["trained tokens"] / train["time (s)"])
    assert train["% of bound"] > step["% of bound"]  # the update alone runs closer to the peak


def test_every_row_has_numeric_time_and_the_printed_table_the_five_columns(bench, step_run):
    printed = bench[1]
    header = next(line for line in printed.splitlines() if line.startswith("| what"))
    assert [c.strip() for c in header.strip("|").split("|")][:5] == [
        "what", "size", "time (s)", "throughput", "% of bound"]
    assert printed.count("| RL step (all of it) |") == 1
    for r in step_run:
        assert isinstance(r["time (s)"], float)
    for r in bench[0]:
        assert r["throughput/value"] is None or isinstance(r["throughput/value"], float)
        assert r["% of bound"] is None or isinstance(r["% of bound"], float)
    measured = [r for r in step_run if r["% of bound"] is not None]
    assert len(measured) >= 5


def test_padding_efficiency_of_the_run_and_of_an_mm_eureka_step(bench, step_run, padding):
    # the run packs its micro-batches (the default) without sequence parallelism: no padding
    assert step_run[0]["padding efficiency"] == 1.0
    padded = padding["padding efficiency, padded micro-batches"]
    packed = padding["padding efficiency, packed micro-batches"]
    assert padded["real tokens"] == packed["real tokens"] == packed["computed tokens"]
    assert packed["throughput/value"] == 100.0
    assert padded["computed tokens"] > padded["real tokens"]
    assert padded["throughput/value"] == pytest.approx(
        100 * padded["real tokens"] / padded["computed tokens"])
    assert packed["micro-batches"] < padded["micro-batches"]
    assert "| padding efficiency, packed micro-batches |" in bench[1]
