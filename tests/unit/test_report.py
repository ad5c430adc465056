"""End-of-run report: PNGs that decode, plots skipped without data, sparse series drawn with
markers, and summary numbers checked against values computed by hand from the records."""
from __future__ import annotations

import sys

import pytest

from eureka_megatron.trainer import report as R
from eureka_megatron.trainer.metrics import MetricsWriter
from eureka_megatron.trainer.report import PLOTS, plot_metrics, write_report, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(n=6):
    """Hand-made run: eval every 3 steps, one null loss, a repeated best reward."""
    recs = []
    for s in range(1, n + 1):
        recs.append({"step": s,
                     "rewards/total": [0.2, 0.5, 0.9, 0.4, 0.9, 0.7][s - 1],
                     "rewards/accuracy": 0.1 * s,
                     "response_length/mean": 100.0 + 10 * s,
                     "reflection/rate": 0.05 * s,
                     "loss": None if s == 1 else -0.01 * s,
                     "time/step_s": [30.0, 20.0, 25.0, 20.0, 40.0, 45.0][s - 1]})
        if s % 3 == 0:
            recs.append({"step": s, "eval/accuracy": {3: 0.4, 6: 0.35}[s]})
    return recs


def _assert_png(path, width=700, height=400):
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image
    img = matplotlib.image.imread(path)  # decodes the whole file: not just a valid header
    assert img.shape[:2] == (height, width)
    assert img.std() > 0  # something was drawn


def test_plot_metrics_writes_one_valid_png_per_plot(tmp_path):
    paths = plot_metrics(_records(), tmp_path / "plots")
    assert paths == [tmp_path / "plots" / f"{name}.png" for name in PLOTS]
    for p in paths:
        _assert_png(p)


def test_plot_without_any_series_is_not_written(tmp_path):
    recs = [{"step": 1, "rewards/total": 1.0, "reflection/rate": None},
            {"step": 2, "rewards/total": 0.5, "reflection/rate": float("nan"), "other": 1.0}]
    paths = plot_metrics(recs, tmp_path)
    assert paths == [tmp_path / "reward.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reward.png"]
    assert plot_metrics([{"step": 1, "other": 1.0}], tmp_path / "none") == []


def test_series_skips_nulls_and_later_record_wins():
    recs = [{"step": 2, "a": 2.0}, {"step": 1, "a": 1.0}, {"step": 3, "a": None},
            {"step": 4, "a": True}, {"step": 2, "a": 20.0}, {"step": 5, "b": 1.0}]
    assert R.series(recs, "a") == [(1, 1.0), (2, 20.0)]
    assert R.series(recs, "missing") == []


@pytest.fixture
def drawn(monkeypatch):
    """PNG file name -> the Figure saved to it, to inspect what was drawn."""
    from matplotlib.figure import Figure
    figs = {}
    real_savefig = Figure.savefig

    def capture(self, path, *a, **kw):
        figs[path.name] = self
        return real_savefig(self, path, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    return figs


def _lines(fig):
    return {ln.get_label(): ln for ln in fig.axes[0].get_lines()}


def test_sparse_series_get_markers(tmp_path, drawn):
    """eval/accuracy, measured every few steps, is drawn with markers; a dense series is a line."""
    plot_metrics(_records(), tmp_path)
    lines = _lines(drawn["accuracy.png"])
    assert set(lines) == {"rewards/accuracy", "eval/accuracy"}
    assert lines["eval/accuracy"].get_marker() == "o"
    assert list(lines["eval/accuracy"].get_xdata()) == [3, 6]
    assert list(lines["eval/accuracy"].get_ydata()) == [0.4, 0.35]
    assert lines["rewards/accuracy"].get_marker() in ("None", None, "")
    assert list(lines["rewards/accuracy"].get_xdata()) == [1, 2, 3, 4, 5, 6]


def test_long_series_gets_a_moving_average(tmp_path, drawn):
    recs = [{"step": s, "rewards/total": float(s % 2)} for s in range(1, 101)]
    plot_metrics(recs, tmp_path)
    lines = _lines(drawn["reward.png"])
    assert set(lines) == {"rewards/total", "rewards/total, mean of last 5"}
    smooth = list(lines["rewards/total, mean of last 5"].get_ydata())
    assert smooth[:3] == [1.0, 0.5, pytest.approx(2 / 3)]  # mean of the points so far
    assert smooth[-1] == pytest.approx(0.4)  # steps 96..100: 0,1,0,1,0


def test_summary_first_last_best(tmp_path):
    out = write_summary(_records(), tmp_path / "summary.md", title="Run A")
    text = out.read_text()
    assert text.startswith("# Run A\n")
    assert "6 steps logged (step 1 to 6)." in text
    assert "Training time over the logged steps: 0.05 h (180 s)." in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "metric" not in ln]
    assert rows == [
        # max 0.9 first reached at step 3 (tie with step 5 -> earliest)
        "| rewards/total | 0.2 (step 1) | 0.7 (step 6) | 0.9 (step 3) |",
        "| rewards/accuracy | 0.1 (step 1) | 0.6 (step 6) | 0.6 (step 6) |",
        # first and last *measured*, not step 1 / step 6 of the training records
        "| eval/accuracy | 0.4 (step 3) | 0.35 (step 6) | 0.4 (step 3) |",
        "| response_length/mean | 110 (step 1) | 160 (step 6) | - |",
        "| reflection/rate | 0.05 (step 1) | 0.3 (step 6) | - |",
        "| loss | -0.02 (step 2) | -0.06 (step 6) | - |",  # step 1 was null
        "| time/step_s | 30 (step 1) | 45 (step 6) | 20 (step 2) |",  # min, earliest of ties
    ]
    assert "## Settings" not in text and "## Curves" not in text


def test_summary_settings_and_relative_image_links(tmp_path):
    plots = plot_metrics(_records(), tmp_path / "run" / "plots")
    out = write_summary(_records(), tmp_path / "run" / "summary.md", title="t",
                        settings={"model": "Qwen2.5-VL-7B", "lr": 1e-6, "note": "a|b"},
                        plots=plots)
    text = out.read_text()
    assert "| setting | value |\n|---|---|\n| model | Qwen2.5-VL-7B |\n| lr | 1e-06 |\n" \
           "| note | a\\|b |\n" in text
    for name in PLOTS:
        assert f"![{name}](plots/{name}.png)" in text
    assert str(tmp_path) not in text  # links survive moving the run directory


def test_write_report_end_to_end(tmp_path):
    with MetricsWriter(tmp_path, total_steps=6, tensorboard=False, progress=False) as w:
        for rec in _records():
            w.log(rec["step"], {k: (float("nan") if v is None else v)
                                for k, v in rec.items() if k != "step"})
    out = write_report(tmp_path, title="e2e", settings={"steps": 6})
    assert out == tmp_path / "summary.md"
    text = out.read_text()
    assert "| rewards/total | 0.2 (step 1) | 0.7 (step 6) | 0.9 (step 3) |" in text
    assert "| eval/accuracy | 0.4 (step 3) | 0.35 (step 6) | 0.4 (step 3) |" in text
    for name in PLOTS:
        _assert_png(tmp_path / f"{name}.png")
        assert f"![{name}]({name}.png)" in text


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises
    with MetricsWriter(tmp_path, total_steps=2, tensorboard=False, progress=False) as w:
        w.log(1, {"rewards/total": 0.25})
        w.log(2, {"rewards/total": 0.5})
    text = write_report(tmp_path, title="no mpl").read_text()
    assert "matplotlib is not installed" in text
    assert "| rewards/total | 0.25 (step 1) | 0.5 (step 2) | 0.5 (step 2) |" in text
    assert not list(tmp_path.glob("*.png")) and "![" not in text


def test_write_report_without_metrics(tmp_path):
    text = write_report(tmp_path, title="empty").read_text()
    assert "No metrics were recorded." in text
    assert not list(tmp_path.glob("*.png"))


def test_cli(tmp_path, capsys):
    with MetricsWriter(tmp_path / "myrun", total_steps=1, tensorboard=False, progress=False) as w:
        w.log(1, {"rewards/total": 1.0})
    R.main([str(tmp_path / "myrun")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "myrun" / "summary.md")
    assert (tmp_path / "myrun" / "summary.md").read_text().startswith("# myrun\n")
    assert (tmp_path / "myrun" / "reward.png").exists()
