"""End-of-run report from `metrics.jsonl`: PNG curves and a short markdown summary.

It reads only the JSONL log (not TensorBoard), so it works on a killed run's directory too:
    python -m eureka_megatron.trainer.report RUN_DIR [--title TITLE]
Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch, no display
needed); without matplotlib the report is the summary alone, with a note saying so.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Iterable

from eureka_megatron.trainer.metrics import METRICS_FILE, read_metrics

PLOTS = {"reward": ["rewards/total"],
         "accuracy": ["rewards/accuracy", "eval/accuracy"],
         "response_length": ["response_length/mean"],
         "reflection_rate": ["reflection/rate"]}

# The summary's metrics, and which direction is "best" (None: no best, e.g. the policy loss of a
# PG objective or the KL, whose low values are not better in themselves).
SUMMARY_METRICS: list[tuple[str, str | None]] = [
    ("rewards/total", "max"),
    ("rewards/accuracy", "max"),
    ("eval/accuracy", "max"),
    ("response_length/mean", None),
    ("reflection/rate", None),
    ("loss", None),
    ("kl", None),
    ("filter/keep_rate", None),
    ("time/step_s", "min"),
    ("tokens_per_s", "max"),
]
SUMMARY_FILE = "summary.md"


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in step order, skipping records without it and null/non-finite
    values; if a step was logged twice the later record wins (it is the newer measurement)."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[r["step"]] = float(v)
    return sorted(by_step.items())


def _moving_average(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _load_matplotlib():
    import matplotlib  # noqa: F401  (import the package first: a missing one raises here)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    return Figure, FigureCanvasAgg


def plot_metrics(records: list[dict], out_dir) -> list[Path]:
    """One PNG per PLOTS entry, out_dir/<name>.png, value vs step; returns the paths written.
    Series missing from the records are left out and a plot with none is not written. Sparse
    series (e.g. eval/accuracy, measured every few steps) get markers so single points show; long
    noisy series get a trailing moving average over ~5% of the points drawn on top.
    Raises ImportError without matplotlib."""
    Figure, FigureCanvasAgg = _load_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_steps = len({r["step"] for r in records})
    written: list[Path] = []
    for name, keys in PLOTS.items():
        present = [(k, s) for k in keys if (s := series(records, k))]
        if not present:
            continue
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for key, pts in present:
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if len(pts) < n_steps or len(pts) == 1:
                ax.plot(xs, ys, marker="o", markersize=4, label=key)
            elif len(pts) >= 40:
                window = max(2, len(ys) // 20)
                line, = ax.plot(xs, ys, alpha=0.3, linewidth=1, label=key)
                ax.plot(xs, _moving_average(ys, window), color=line.get_color(),
                        label=f"{key}, mean of last {window}")
            else:
                ax.plot(xs, ys, label=key)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        written.append(path)
    return written


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _cell(v: object) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def summary_rows(records: list[dict]) -> list[tuple[str, str, str, str]]:
    """(metric, first, last, best) cells for the SUMMARY_METRICS present; "v (step N)" so sparse
    metrics show where they were measured; best is "-" for metrics without a best direction."""
    rows = []
    for key, direction in SUMMARY_METRICS:
        pts = series(records, key)
        if not pts:
            continue
        first, last = pts[0], pts[-1]
        best = "-"
        if direction is not None:
            pick = max if direction == "max" else min
            # first occurrence of the best value (ties -> earliest step)
            b = pick(pts, key=lambda p: (p[1], -p[0]) if direction == "max" else (p[1], p[0]))
            best = f"{_fmt(b[1])} (step {b[0]})"
        rows.append((key, f"{_fmt(first[1])} (step {first[0]})",
                     f"{_fmt(last[1])} (step {last[0]})", best))
    return rows


def write_summary(records: list[dict], out_path, *, title: str,
                  settings: dict[str, object] | None = None, plots: Iterable[Path] = (),
                  notes: Iterable[str] = ()) -> Path:
    """A short markdown summary: title, settings table, first/last/best of the key metrics, and
    the plots linked relative to the summary (so the run directory can be moved or zipped)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    steps = sorted({r["step"] for r in records})
    if steps:
        lines.append(f"{len(steps)} steps logged (step {steps[0]} to {steps[-1]}).")
        step_times = series(records, "time/step_s")
        if step_times:
            total = sum(v for _, v in step_times)
            lines.append(f"Training time over the logged steps: {total / 3600:.2f} h "
                         f"({total:.0f} s).")
    else:
        lines.append("No metrics were recorded.")
    lines.extend(f"\n{n}" for n in notes)
    lines.append("")
    if settings:
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in settings.items()]
        lines.append("")
    rows = summary_rows(records)
    if rows:
        lines += ["## Metrics", "", "| metric | first | last | best |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(r)} |" for r in rows]
        lines.append("")
    plots = list(plots)
    if plots:
        lines += ["## Curves", ""]
        for p in plots:
            rel = Path(os.path.relpath(Path(p).resolve(), out_path.parent.resolve())).as_posix()
            lines += [f"![{Path(p).stem}]({rel})", ""]
    out_path.write_text("\n".join(lines))
    return out_path


def write_report(out_dir, *, title: str, settings: dict[str, object] | None = None) -> Path:
    """Read out_dir/metrics.jsonl, write the PNGs into out_dir and out_dir/summary.md; returns the
    summary's path. A missing metrics file gives a summary saying nothing was recorded (a run that
    died before its first step should still end with a report, not a second traceback)."""
    out_dir = Path(out_dir)
    path = out_dir / METRICS_FILE
    records = read_metrics(path) if path.exists() else []
    notes: list[str] = []
    plots: list[Path] = []
    if records:
        try:
            plots = plot_metrics(records, out_dir)
        except ImportError:
            notes.append("Plots were not drawn: matplotlib is not installed.")
    return write_summary(records, out_dir / SUMMARY_FILE, title=title, settings=settings,
                         plots=plots, notes=notes)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write plots and summary.md for a run directory.")
    ap.add_argument("run_dir")
    ap.add_argument("--title", default=None, help="default: the run directory's name")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    print(write_report(run_dir, title=args.title or run_dir.resolve().name))


if __name__ == "__main__":
    main()
