"""Benchmark output: a markdown table on stdout, the same rows as JSON on disk."""
from __future__ import annotations

import datetime
import json
from pathlib import Path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


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
