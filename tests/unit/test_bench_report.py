"""The bench table contract: five leading columns, numbers (not strings) in the JSON rows."""
import json

import pytest

from eureka_megatron.bench.report import LEAD, lead, markdown_table, write_json


def test_lead_fields_are_numbers_and_the_table_starts_with_the_five_columns(tmp_path):
    row = {**lead("sync TP1", "1 GB", 0.5, 2.0, "GB/s", 40.0, "memory copy 5 GB/s"), "tensors": 7}
    assert row["time (s)"] == 0.5 and row["throughput/value"] == 2.0
    assert row["throughput/unit"] == "GB/s" and row["% of bound"] == 40.0
    assert row["throughput"] == "2 GB/s"
    table = markdown_table([row], LEAD + ["tensors"])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["what", "size", "time (s)", "throughput", "% of bound"]
    assert table.splitlines()[2].split("|")[1:-1] == [
        " sync TP1 ", " 1 GB ", " 0.5 ", " 2 GB/s ", " 40 ", " memory copy 5 GB/s ", " 7 "]
    out = tmp_path / "b.json"
    write_json(out, "sync", "here", [row])
    write_json(out, "other", "here", [row])  # a second bench is added, the first kept
    data = json.loads(out.read_text())
    assert set(data) == {"sync", "other"}
    assert data["sync"]["rows"][0]["% of bound"] == 40.0


def test_unmeasured_fields_are_null_and_shown_as_na():
    row = lead("liger fwd: OOM", "big", None, None, "TFLOP/s", None, "peak")
    assert row["time (s)"] is None and row["throughput/value"] is None and row["% of bound"] is None
    cells = markdown_table([row], LEAD).splitlines()[2].split("|")[1:-1]
    assert [c.strip() for c in cells[2:5]] == ["n/a", "n/a", "n/a"]


def test_run_bench_prints_and_writes_the_kernels_table(tmp_path, capsys):
    from eureka_megatron.bench import run_bench

    out = tmp_path / "b.json"
    assert run_bench("kernels", quick=True, out=out) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("| what"))
    assert [c.strip() for c in header.strip("|").split("|")][:6] == LEAD
    rows = json.loads(out.read_text())["kernels"]["rows"]
    assert [r["what"] for r in rows] == ["torch reference fwd", "torch reference fwd+bwd"]
    for r in rows:
        assert isinstance(r["time (s)"], float) and r["time (s)"] > 0
        assert r["throughput/unit"] == "TFLOP/s"
        assert r["throughput/value"] == pytest.approx(r["TFLOP/s"], rel=0.05, abs=1e-3)
        assert 0 < r["% of bound"]
