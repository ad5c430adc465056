"""Per-step metrics of the RL trainer: crash-safe JSONL log, TensorBoard scalars, progress bar.

`out_dir/metrics.jsonl` holds one JSON object per logged step: `{"step": N, "<metric>": value}`.
Steps are 1-based (step N is logged after the N-th update; a checkpoint at step N covers steps
1..N). Each line is flushed and fsynced before `log` returns, so a killed run loses at most the
line being written; that torn last line is ignored by `read_metrics` and dropped by
`truncate_after` and when a writer reopens the file.

Resume protocol (rank 0 only): on restarting from checkpoint N, call
`truncate_after(out_dir / METRICS_FILE, N)` to drop the lines a killed run wrote after that
checkpoint, then open `MetricsWriter(out_dir, total_steps=..., start_step=N)`, which appends.
The writer refuses to open a file that still holds steps > start_step, so a forgotten truncate
cannot silently interleave two runs (a fresh run is start_step=0: truncate_after(path, 0) clears
a stale file).

TensorBoard: each writer opens a new event file under `out_dir/tensorboard`, so after a resume
the event files hold the steps after N twice (old run and new run). A resumed writer
(`SummaryWriter(purge_step=N+1)`) first writes a SessionLog.START event at step N+1, which tells
TensorBoard to discard the older events from step N+1 on (TensorBoard's orphaned-data purge);
readers that ignore it see both copies of those steps, the newer written last.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Mapping

from tqdm.auto import tqdm

from eureka_megatron.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsWriter:
    """One JSON object per line with "step" (int) first, then the metric values; each line is
    flushed and fsynced so a killed run loses nothing finished. Also writes TensorBoard scalars
    under out_dir/tensorboard and shows a tqdm progress bar (ETA over total_steps) with a few key
    metrics. Create it on one rank only (rank 0)."""

    def __init__(self, out_dir, *, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True,
                 postfix_keys: Iterable[str] = ("rewards/total", "rewards/accuracy",
                                                "eval/accuracy", "loss")):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.postfix_keys = tuple(postfix_keys)
        self._postfix: dict[str, str] = {}
        self._last_step: int | None = None
        self._closed = False

        _prepare_for_append(self.path, self.start_step)
        self._file = open(self.path, "a", encoding="utf-8")

        self._tb = None
        if tensorboard:
            self._open_tensorboard()

        self._bar = None
        if progress:
            self._bar = tqdm(total=self.total_steps, initial=min(self.start_step, self.total_steps),
                             unit="step", dynamic_ncols=True, file=sys.stderr)

    def _open_tensorboard(self) -> None:
        try:  # torch is loaded already where metrics are written: the training process
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # keep training; the JSONL log is the record of truth
            warnings.warn(f"TensorBoard logging disabled: {e}")
            return
        # a resumed run purges the killed run's events from start_step+1 on (see module doc)
        self._tb = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR),
                                 purge_step=self.start_step + 1 if self.start_step > 0 else None)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append one line for `step` (durable on return), add the finite values to TensorBoard and
        advance the progress bar. Non-finite values are written as null and skipped in TensorBoard.
        Several calls for one step (e.g. eval metrics separately) are allowed; steps must not go
        backwards within one writer."""
        if self._closed:
            raise RuntimeError("MetricsWriter.log after close()")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step = int(step)
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"step {step} logged after step {self._last_step}")
        values = _clean_values(metrics)

        line = json.dumps({"step": step, **{k: (v if math.isfinite(v) else None)
                                            for k, v in values.items()}}, allow_nan=False)
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_step = step

        if self._tb is not None:
            for k, v in values.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, float(v), step)
            self._tb.flush()  # a step takes seconds; keep TensorBoard as current as the JSONL

        if self._bar is not None:
            for k in self.postfix_keys:
                if k in values and math.isfinite(values[k]):
                    self._postfix[k] = f"{values[k]:.4g}"  # sparse keys keep their last value
            if self._postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            advance = min(step, self.total_steps) - self._bar.n
            if advance > 0:
                self._bar.update(advance)  # redraws (at most every 0.1 s) with the new postfix

    def close(self) -> None:
        """Close the log, the event file and the bar; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clean_values(metrics: Mapping[str, float]) -> dict[str, float | int]:
    """Numbers only, so the JSONL stays plottable: bool -> 0/1, ints kept, other reals -> float.
    Tensors and strings raise TypeError naming the key (call .item() first; that sync is the
    caller's choice)."""
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise TypeError(f"metric names must be str, got {k!r}")
        if k == "step":
            raise ValueError("'step' is reserved; pass it as log(step, ...)")
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, numbers.Integral):
            out[k] = int(v)
        elif isinstance(v, numbers.Real):
            out[k] = float(v)
        else:
            raise TypeError(f"metric {k!r} must be a number, got {type(v).__name__}")
    return out


# --- reading, resuming ----------------------------------------------------------------------


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict]], int]:
    """(raw line, record) for each complete record, and the byte length of the file up to the
    end of the last complete record (a torn tail beyond it is not a record). A malformed line
    that is not the last one is corruption, not a kill mid-write, so it raises."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    out: list[tuple[str, dict]] = []
    good_end = 0
    pos = 0
    for i, raw in enumerate(lines):
        is_last = i == len(lines) - 1
        end = pos + len(raw) + (0 if is_last else 1)
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            rec = _parse_record(text)
            if rec is None:
                if is_last:  # torn by a kill mid-write
                    break
                raise ValueError(f"{path}:{i + 1}: not a metrics record: {text[:80]!r}")
            out.append((text, rec))
        good_end = end
        pos = end
    return out, good_end


def _parse_record(text: str) -> dict | None:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or isinstance(rec.get("step"), bool) \
            or not isinstance(rec.get("step"), int):
        return None
    return rec


def read_metrics(path) -> list[dict]:
    """All records in file order; a torn last line (a kill mid-write) is ignored. Values written
    as null (non-finite) come back as None. A missing file raises FileNotFoundError."""
    return [rec for _, rec in _parse_lines(Path(path))[0]]


def truncate_after(path, step: int) -> int:
    """Keep only the records with "step" <= `step` (and drop a torn last line); returns how many
    were kept. Used on resume from checkpoint `step`: later lines were written by the killed run
    after its last checkpoint and will be logged again. Atomic (`write_text_atomic`): a kill here
    leaves the old or the new file, never a half-written one. A missing file returns 0."""
    path = Path(path)
    if not path.exists():
        return 0
    parsed, _ = _parse_lines(path)
    kept = [text for text, rec in parsed if rec["step"] <= step]
    new = "".join(t + "\n" for t in kept)
    if new.encode("utf-8") == path.read_bytes():
        return len(kept)  # nothing to drop: leave the file (and its mtime) alone
    write_text_atomic(path, new)
    return len(kept)


def _prepare_for_append(path: Path, start_step: int) -> None:
    """Before appending: refuse a file that still has steps > start_step (truncate_after was not
    called, two runs would interleave), and cut a torn tail so the next line does not glue onto
    it. A complete last record that only lacks its newline gets the newline."""
    if not path.exists() or path.stat().st_size == 0:
        return
    parsed, good_end = _parse_lines(path)
    late = [rec["step"] for _, rec in parsed if rec["step"] > start_step]
    if late:
        raise ValueError(
            f"{path} already has steps up to {max(late)} > start_step {start_step}; call "
            f"truncate_after(path, {start_step}) before reopening it")
    if good_end < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    if good_end > 0:
        with open(path, "rb") as f:
            f.seek(good_end - 1)
            ends_with_newline = f.read(1) == b"\n"
        if not ends_with_newline:
            with open(path, "ab") as f:
                f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())


# --- throughput -----------------------------------------------------------------------------


def mfu(tokens_per_s: float, n_params: int, peak_flops: float) -> float:
    """Model FLOPs utilisation of the training update: 6 * n_params * tokens_per_s / peak_flops.

    6N FLOPs per token is the usual dense-transformer estimate (2N forward + 4N backward). It
    ignores the attention score FLOPs (~12 * layers * hidden * seq per token, small at short
    sequence lengths), and counts no rollout generation or reference/old-policy log-prob forwards
    (2N per token each), so it describes the policy-update phase only. `tokens_per_s` and
    `peak_flops` must cover the same devices (per GPU / per GPU, or whole job / whole job); pass
    only the parameters that are trained on these tokens (leave out e.g. a frozen vision tower).
    """
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return 6.0 * n_params * tokens_per_s / peak_flops
