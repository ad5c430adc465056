"""`bench memory`: per-rank peak host memory of building the actor's model (from an HF directory
and from a megatron checkpoint) and of an HF export, at TP1 / TP2 / TP4, on a synthetic
checkpoint with Qwen2.5-VL-7B's layer shapes (a few layers).

Each rank measures its own peak RSS over the step (Linux `VmHWM`, reset before it through
`/proc/self/clear_refs`) above its RSS before it. The ideal is what the step must hold: building,
the rank's own shard (fp32 on CPU) plus the largest single tensor read from the checkpoint;
exporting, the largest megatron tensor (a fused gate + up), which rank 0 assembles whole before
the writer takes its HF pieces. The model is built without megatron's random initialisation
(`models.llm.building`), as the actor builds it.
`--quick`: one layer of each kind, a vocabulary of 8192, TP1 and TP2.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from eureka_megatron.bench.convert import QWEN2_5_VL_7B, write_synthetic
from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.config import ParallelConfig
from eureka_megatron.convert.export import write_hf
from eureka_megatron.convert.hf_io import HFCheckpoint
from eureka_megatron.convert.run import hf_to_megatron
from eureka_megatron.models.init import fill_global_tensors
from eureka_megatron.models.llm import building
from eureka_megatron.models.registry import family_for
from eureka_megatron.runtime.distributed import init_distributed
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer import checkpoint

GIB = 2**30


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """Peak RSS above the RSS at entry, over a `with` block (Linux only)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.start, self.t0 = _status("VmRSS"), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM") - self.start
        self.seconds = time.perf_counter() - self.t0


def _rank(hf_dir: str, megatron_dir: str | None, tp: int, export_to: str | None) -> dict:
    """Build (and optionally export) the model at TP `tp`; this rank's numbers."""
    ckpt = HFCheckpoint(hf_dir)
    fam = family_for(ckpt.config)
    cfg = fam.config_from_hf(ckpt.config, Path(hf_dir))
    layout = fam.detect_layout(ckpt.names)
    mapping = fam.mapping(cfg, layout)
    par = ParallelConfig(tensor_parallel=tp, nproc=tp)
    init_distributed(par)
    with PeakRSS() as build, building(initialize=False):
        chunks = fam.build_chunks(cfg, par)
        if megatron_dir:
            checkpoint.load_weights(chunks, megatron_dir)
        else:
            fill_global_tensors(chunks, mapping.source(ckpt.get, ckpt.expert))
    shard = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    out = {"build_peak": build.peak, "build_s": build.seconds, "shard": shard}
    if export_to:
        with PeakRSS() as export:
            write_hf(chunks, mapping, export_to, hf_dir)
        out |= {"export_peak": export.peak, "export_s": export.seconds}
    return out


def _largest(hf_dir: Path) -> tuple[int, int]:
    """(bytes of the largest checkpoint tensor, fp32 bytes of the largest megatron tensor -- e.g.
    a fused gate + up -- which an export assembles whole before writing its HF pieces)."""
    ckpt = HFCheckpoint(hf_dir)
    fam = family_for(ckpt.config)
    mapping = fam.mapping(fam.config_from_hf(ckpt.config, hf_dir), fam.detect_layout(ckpt.names))
    read = max(math.prod(ckpt.shape(n)) * 2 for n in ckpt.names)  # bf16
    fused = max(sum(math.prod(ckpt.shape(n)) for n in names) * 4 for *_, names in mapping.entries())
    return read, fused


def _row(what: str, tp: int, seconds: float, peak: int, ideal: int, shard: int) -> dict:
    return {**lead(what, f"TP{tp}", seconds, peak / GIB, "GiB peak (max rank)",
                   100 * ideal / peak if peak > 0 else None, f"ideal {ideal / GIB:.2f} GiB"),
            "TP": tp, "peak (GiB)": round(peak / GIB, 3), "ideal (GiB)": round(ideal / GIB, 3),
            "shard (GiB)": round(shard / GIB, 3)}


def run(quick: bool = False) -> tuple[list[dict], list[str]]:
    config = json.loads(json.dumps(QWEN2_5_VL_7B))
    layers = 1 if quick else 2
    config["num_hidden_layers"] = layers
    config["vision_config"]["depth"] = 1
    config["vision_config"]["fullatt_block_indexes"] = [0]
    if quick:
        config["vocab_size"] = 8192
    tps = (1, 2) if quick else (1, 2, 4)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    rows = []
    try:
        hf, meg = work / "hf", work / "meg"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps(config))
        size = write_synthetic(config, hf)
        hf_to_megatron(hf, meg, progress=False)
        print(f"[bench memory] synthetic Qwen2.5-VL-7B widths, {layers}+1 layers: "
              f"{size / GIB:.2f} GiB bf16", file=sys.stderr, flush=True)
        largest_read, largest_fused = _largest(hf)
        for tp in tps:
            for source in ("hf", "megatron"):
                export = str(work / f"export-tp{tp}") if source == "hf" else None
                results = launch(_rank, tp, str(hf), str(meg) if source == "megatron" else None,
                                 tp, export, timeout=3600.0)
                peak = max(r["build_peak"] for r in results)
                shard = max(r["shard"] for r in results)
                rows.append(_row(f"build actor from {source}", tp,
                                 max(r["build_s"] for r in results), peak,
                                 shard + largest_read, shard))
                if export:
                    rows.append(_row("HF export (writer, rank 0)", tp, results[0]["export_s"],
                                     results[0]["export_peak"], largest_fused, shard))
                    shutil.rmtree(export, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, LEAD + ["peak (GiB)", "ideal (GiB)", "shard (GiB)"]
