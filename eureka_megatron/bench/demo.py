"""`bench demo`: the CPU demo as a user runs it, once per seed, timed from the command's start.

Each seed runs `eureka-megatron demo --out DIR/seed_S train.seed=S` in a fresh process (stage 0
included). Per seed: wall time to 0.5 and 0.9 held-out greedy accuracy (`eval/accuracy`, read
with each metrics line's `time/unix_s`), final and best accuracy, whether it collapsed (final <
best - 0.05), and the median step split into generate / reward / log-prob prep / train / sync.
The bound is the floor of `cpu-demo-feasibility.md`: a bare PyTorch GRPO loop (no Megatron, no
engine, no reward pool) reached 0.94 at 108 s on the same kind of machine; % of bound is that
time over ours to 0.9.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.errors import OutputExistsError

SEEDS = (1234, 1, 2, 3, 4)
FLOOR_S = 108.0  # bare PyTorch loop to 0.94 (shared/reference/cpu-demo-feasibility.md)
BOUND = "bare PyTorch loop: 0.94 at 108 s"
SPLIT = {"generate": "time/generate_s", "reward": "time/reward_s", "log-prob": "time/logprobs_s",
         "train": "time/train_s", "sync": "time/sync_s"}
COLUMNS = LEAD + ["t 0.5 (s)", "t 0.9 (s)", "step 0.9", "final", "best", "collapsed", "steps",
                  "s/step"] + list(SPLIT)


def seed_row(seed: int, rows: list[dict], t_start: float, wall: float, ok: bool) -> dict:
    """One seed's table row from its metrics.jsonl rows."""
    evals = [r for r in rows if r.get("eval/accuracy") is not None]
    steps = [r for r in rows if r.get("time/step_s") is not None]

    def first(threshold):
        hit = next((r for r in evals if r["eval/accuracy"] >= threshold), None)
        return hit, (hit["time/unix_s"] - t_start if hit and "time/unix_s" in hit else None)

    hit9, t9 = first(0.9)
    _, t5 = first(0.5)
    final = evals[-1]["eval/accuracy"] if evals else None
    best = max((r["eval/accuracy"] for r in evals), default=None)
    row = lead(f"demo seed {seed}" + ("" if ok else " (failed)"),
               f"{len(steps)} GRPO steps", wall, t9 and 1 / t9, "1/s to 0.9",
               t9 and 100 * FLOOR_S / t9, BOUND)
    row["throughput"] = "n/a" if t9 is None else f"0.9 in {t9:.0f} s"
    row.update({"seed": seed, "t 0.5 (s)": t5, "t 0.9 (s)": t9,
                "step 0.9": hit9["step"] if hit9 else None, "final": final, "best": best,
                "collapsed": None if final is None else final < best - 0.05, "steps": len(steps),
                "s/step": _median(r["time/step_s"] for r in steps)})
    for name, key in SPLIT.items():
        row[name] = _median(r[key] for r in steps if r.get(key) is not None)
    return row


def _median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def run(quick: bool = False, seeds: tuple[int, ...] | None = None, out_dir: Path | None = None,
        overrides: list[str] | None = None):
    """Run the demo per seed (quick: the first seed, 60 GRPO steps); rows + columns."""
    seeds = tuple(seeds or SEEDS)[:1 if quick else None]
    extra = (["train.steps=60", "eval.interval=20"] if quick else []) + list(overrides or [])
    base = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bench-demo-"))
    exe = Path(sys.executable).parent / "eureka-megatron"
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "eureka_megatron.cli"]
    rows = []
    for i, seed in enumerate(seeds, 1):
        out = base / f"seed_{seed}"
        if (out / "metrics.jsonl").exists():
            raise OutputExistsError(f"{out} holds a run already; pass another --out")
        print(f"[bench demo] seed {seed} ({i}/{len(seeds)}) -> {out}", file=sys.stderr, flush=True)
        t_start = time.time()
        proc = subprocess.run([*command, "demo", "--out", str(out), f"train.seed={seed}",
                               "output.progress=false", *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.time() - t_start
        (base / f"seed_{seed}.log").write_text(proc.stdout)
        metrics = out / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        row = seed_row(seed, [json.loads(x) for x in lines], t_start, wall, proc.returncode == 0)
        print(f"[bench demo] seed {seed}: final {row['final']}, best {row['best']}, "
              f"0.9 at {row['t 0.9 (s)'] and round(row['t 0.9 (s)'])} s, {wall:.0f} s in all",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows, COLUMNS
