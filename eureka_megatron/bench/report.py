"""Benchmark output: a markdown table on stdout, the same rows as JSON on disk.

Every bench's table starts with the same columns (`LEAD`): what was measured, at what size, the
time, the throughput with its unit, and that throughput as a percent of the hardware bound the
`bound` column names; the bench's own detail columns follow. `lead` builds those fields; the
JSON rows keep them as numbers (`time (s)`, `throughput/value`, `% of bound`) next to the
display string (`throughput`) and the unit (`throughput/unit`).
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

LEAD = ["what", "size", "time (s)", "throughput", "% of bound", "bound"]


def lead(what: str, size: str, seconds: float | None, value: float | None, unit: str,
         percent: float | None, bound: str) -> dict:
    """The leading fields of a bench row. None (time, value, percent) where nothing was measured
    (a failed run) or there is no bound for that row; shown as "n/a"."""
    return {"what": what, "size": size,
            "time (s)": None if seconds is None else float(seconds),
            "throughput": "n/a" if value is None else f"{_fmt(float(value))} {unit}",
            "% of bound": None if percent is None else float(percent),
            "bound": bound,
            "throughput/value": None if value is None else float(value),
            "throughput/unit": unit}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c) for c in columns) + " |")
    return "\n".join(lines)


def _cell(row: dict, column: str) -> str:
    v = row.get(column, "")
    if v is None:
        return "n/a" if column in LEAD else ""
    return _fmt(v)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def write_json(path: Path | None, name: str, machine: str, rows: list[dict]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {"date": datetime.date.today().isoformat(), "machine": machine, "rows": rows}
    path.write_text(json.dumps(data, indent=1))
