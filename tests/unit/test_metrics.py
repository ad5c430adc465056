"""metrics.jsonl writer/reader, resume truncation, TensorBoard events and the progress bar,
checked against the bytes on disk and against what TensorBoard itself reads back."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from eureka_megatron.trainer import metrics as M
from eureka_megatron.trainer.metrics import (METRICS_FILE, MetricsWriter, mfu, read_metrics,
                                             truncate_after)


def _writer(tmp_path, **kw):
    kw.setdefault("total_steps", 10)
    kw.setdefault("tensorboard", False)
    kw.setdefault("progress", False)
    return MetricsWriter(tmp_path, **kw)


def _tb_scalars(tmp_path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_round_trip_nan_and_types(tmp_path):
    with _writer(tmp_path) as w:
        w.log(1, {"rewards/total": 0.5, "loss": float("nan"), "kl": float("inf"),
                  "n": 7, "flag": True, "np": np.float32(0.25), "npi": np.int64(3)})
        w.log(2, {"rewards/total": -1.25, "loss": 0.125})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])  # plain json: no NaN/Infinity tokens in the file
    assert list(first) == ["step", "rewards/total", "loss", "kl", "n", "flag", "np", "npi"]
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert read_metrics(tmp_path / METRICS_FILE) == [
        {"step": 1, "rewards/total": 0.5, "loss": None, "kl": None, "n": 7, "flag": 1,
         "np": 0.25, "npi": 3},
        {"step": 2, "rewards/total": -1.25, "loss": 0.125},
    ]


def test_each_line_is_on_disk_before_log_returns(tmp_path):
    """A kill right after log() must not lose that step: the line is in the file, not a buffer."""
    w = _writer(tmp_path)
    w.log(1, {"a": 1.0})
    assert read_metrics(tmp_path / METRICS_FILE) == [{"step": 1, "a": 1.0}]
    w.close()
    w.close()  # idempotent


@pytest.mark.parametrize("bad", ["0.5", None, [1.0], 1j, object()])
def test_non_number_raises_type_error_naming_the_key(tmp_path, bad):
    with _writer(tmp_path) as w:
        with pytest.raises(TypeError, match="rewards/format"):
            w.log(1, {"ok": 1.0, "rewards/format": bad})
    # nothing half-written: the bad call wrote no line
    assert read_metrics(tmp_path / METRICS_FILE) == []


def test_tensor_value_raises_type_error(tmp_path):
    torch = pytest.importorskip("torch")
    with _writer(tmp_path) as w:
        with pytest.raises(TypeError, match="'loss'"):
            w.log(1, {"loss": torch.tensor(0.5)})


def test_step_validation(tmp_path):
    with _writer(tmp_path) as w:
        with pytest.raises(TypeError, match="step"):
            w.log(1.0, {"a": 1.0})
        with pytest.raises(ValueError, match="reserved"):
            w.log(1, {"step": 1})
        w.log(2, {"a": 1.0})
        w.log(2, {"eval/accuracy": 0.5})  # a second call for the same step is fine
        with pytest.raises(ValueError, match="step 1 logged after step 2"):
            w.log(1, {"a": 1.0})
    w2 = _writer(tmp_path, start_step=2)
    w2.close()
    with pytest.raises(RuntimeError, match="close"):
        w2.log(3, {"a": 1.0})


def _write_lines(path, text):
    path.write_bytes(text.encode())


def test_torn_last_line_is_ignored(tmp_path):
    p = tmp_path / METRICS_FILE
    _write_lines(p, '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a": 3.')
    assert read_metrics(p) == [{"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}]
    # torn inside a multi-byte character, too
    _write_lines(p, '{"step": 1, "a": 1.0}\n')
    with open(p, "ab") as f:
        f.write('{"step": 2, "é'.encode()[:-1])
    assert read_metrics(p) == [{"step": 1, "a": 1.0}]
    # a complete record that only lost its newline is kept
    _write_lines(p, '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}')
    assert [r["step"] for r in read_metrics(p)] == [1, 2]


def test_malformed_middle_line_is_an_error(tmp_path):
    """Only the last line can be torn by a kill; a bad line in the middle is corruption."""
    p = tmp_path / METRICS_FILE
    _write_lines(p, '{"step": 1, "a": 1.0}\n{"step": 2, "a"\n{"step": 3, "a": 3.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(p)
    _write_lines(p, '{"a": 1.0}\n{"step": 3, "a": 3.0}\n')  # no step
    with pytest.raises(ValueError, match=r":1"):
        read_metrics(p)


def test_truncate_after_counts_and_content(tmp_path):
    p = tmp_path / METRICS_FILE
    with _writer(tmp_path) as w:
        for s in range(1, 8):
            w.log(s, {"a": float(s)})
        w.log(7, {"eval/accuracy": 0.5})
    with open(p, "a") as f:
        f.write('{"step": 8, "a": 8')  # killed mid-write
    original_lines = p.read_text().splitlines()[:5]
    assert truncate_after(p, 5) == 5
    assert p.read_text().splitlines() == original_lines  # kept lines byte-identical
    assert [r["step"] for r in read_metrics(p)] == [1, 2, 3, 4, 5]
    assert truncate_after(p, 100) == 5  # nothing to drop
    assert truncate_after(p, 0) == 0
    assert p.read_text() == ""
    assert truncate_after(tmp_path / "missing.jsonl", 3) == 0
    assert not (tmp_path / "missing.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == [METRICS_FILE]  # no temporary files left behind


def test_truncate_after_drops_only_a_torn_tail(tmp_path):
    p = tmp_path / METRICS_FILE
    _write_lines(p, '{"step": 1}\n{"step": 2}\n{"st')
    assert truncate_after(p, 2) == 2
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_truncate_after_is_atomic(tmp_path, monkeypatch):
    """If the process dies before the rename, the original file is untouched and the temporary
    file is gone; the new content only ever appears whole, via os.replace."""
    p = tmp_path / METRICS_FILE
    _write_lines(p, "".join(f'{{"step": {s}, "a": {s}.0}}\n' for s in range(1, 6)))
    before = p.read_bytes()
    seen = {}

    def dying_replace(src, dst):
        seen["src"], seen["dst"] = str(src), str(dst)
        seen["tmp_content"] = open(src).read()
        raise KeyboardInterrupt  # e.g. the kill arrives here

    monkeypatch.setattr(M.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        truncate_after(p, 2)
    assert p.read_bytes() == before
    assert seen["dst"] == str(p) and os.path.dirname(seen["src"]) == str(tmp_path)  # same fs
    assert seen["tmp_content"] == '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n'
    assert sorted(os.listdir(tmp_path)) == [METRICS_FILE]
    monkeypatch.undo()
    assert truncate_after(p, 2) == 2


def test_resume_appends_after_truncate(tmp_path):
    p = tmp_path / METRICS_FILE
    with _writer(tmp_path) as w:
        for s in range(1, 6):
            w.log(s, {"a": float(s)})
    with open(p, "a") as f:
        f.write('{"step": 6, "a"')  # killed mid-write after checkpoint 4 and step 5
    assert truncate_after(p, 4) == 4
    with _writer(tmp_path, start_step=4) as w:
        w.log(5, {"a": 50.0})
        w.log(6, {"a": 60.0})
    assert read_metrics(p) == [{"step": s, "a": float(s)} for s in range(1, 5)] + [
        {"step": 5, "a": 50.0}, {"step": 6, "a": 60.0}]


def test_writer_refuses_steps_beyond_start_step(tmp_path):
    """Forgetting truncate_after would interleave the killed run's lines with the new ones."""
    with _writer(tmp_path) as w:
        for s in range(1, 4):
            w.log(s, {"a": 1.0})
    with pytest.raises(ValueError, match="truncate_after"):
        _writer(tmp_path, start_step=2)
    with pytest.raises(ValueError, match="truncate_after"):
        _writer(tmp_path)  # a fresh run on a stale file
    _writer(tmp_path, start_step=3).close()  # nothing beyond step 3: fine


def test_writer_repairs_torn_tail_before_appending(tmp_path):
    p = tmp_path / METRICS_FILE
    _write_lines(p, '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2')
    with _writer(tmp_path, start_step=1) as w:
        w.log(2, {"a": 20.0})
    assert p.read_text() == '{"step": 1, "a": 1.0}\n{"step": 2, "a": 20.0}\n'
    _write_lines(p, '{"step": 1, "a": 1.0}')  # complete, newline missing
    with _writer(tmp_path, start_step=1) as w:
        w.log(2, {"a": 2.0})
    assert p.read_text() == '{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n'


def test_tensorboard_scalars_written(tmp_path):
    with _writer(tmp_path, tensorboard=True) as w:
        w.log(1, {"rewards/total": 0.5, "loss": float("nan"), "n": 3, "flag": True})
        w.log(2, {"rewards/total": 0.75, "loss": 0.25})
        w.log(2, {"eval/accuracy": 0.625})
    got = _tb_scalars(tmp_path)
    assert got == {"rewards/total": [(1, 0.5), (2, 0.75)], "loss": [(2, 0.25)],  # NaN skipped
                   "n": [(1, 3.0)], "flag": [(1, 1.0)], "eval/accuracy": [(2, 0.625)]}


def test_tensorboard_events_readable_before_close(tmp_path):
    """Flushed per step: a live TensorBoard (or a killed run) sees every finished step."""
    w = _writer(tmp_path, tensorboard=True)
    w.log(1, {"a": 1.5})
    assert _tb_scalars(tmp_path) == {"a": [(1, 1.5)]}
    w.close()


def test_tensorboard_resume_purges_orphaned_steps(tmp_path):
    """The killed run logged steps 1-4 after a checkpoint at 2; the resumed run's START event makes
    TensorBoard drop the old 3-4 and keep the new ones."""
    with _writer(tmp_path, tensorboard=True) as w:
        for s in range(1, 5):
            w.log(s, {"a": float(s)})
    truncate_after(tmp_path / METRICS_FILE, 2)
    with _writer(tmp_path, tensorboard=True, start_step=2) as w:
        for s in range(3, 6):
            w.log(s, {"a": 10.0 * s})
    assert len(os.listdir(tmp_path / "tensorboard")) == 2  # one event file per writer
    assert _tb_scalars(tmp_path) == {"a": [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]}


def test_progress_disabled_writes_nothing(tmp_path, capsys):
    with _writer(tmp_path, progress=False) as w:
        assert w._bar is None
        w.log(1, {"rewards/total": 0.5})
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_bar_shows_position_and_key_metrics(tmp_path, capsys):
    with _writer(tmp_path, progress=True, total_steps=10, start_step=4,
                 postfix_keys=("rewards/total", "eval/accuracy")) as w:
        assert w._bar.n == 4  # resumed: the bar (and its ETA) starts at the checkpoint
        w.log(5, {"rewards/total": 0.5, "loss": 1.0})
        w.log(5, {"eval/accuracy": 0.25})
        w.log(7, {"rewards/total": 0.75})
        assert w._bar.n == 7
        assert w._bar.postfix == "rewards/total=0.75, eval/accuracy=0.25"  # eval kept: sparse
    err = capsys.readouterr().err
    assert "7/10" in err and "rewards/total=0.75" in err and "loss" not in err


def test_no_tensorboard_dir_when_disabled(tmp_path):
    with _writer(tmp_path, tensorboard=False) as w:
        w.log(1, {"a": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_mfu():
    # 7e9 params at 2,000 tok/s on a 989 TFLOP/s (H100 bf16 dense) GPU: 6*7e9*2e3/989e12 = 8.49%
    assert mfu(2000.0, 7_000_000_000, 989e12) == pytest.approx(0.0849343, rel=1e-5)
    assert mfu(0.0, 10, 1.0) == 0.0
    with pytest.raises(ValueError):
        mfu(1.0, 1, 0.0)
    assert math.isclose(mfu(1.0, 1, 6.0), 1.0)
