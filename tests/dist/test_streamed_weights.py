"""Loading the actor from an HF checkpoint and exporting it back stream one tensor at a time.

The checkpoint reads (`HFCheckpoint.get`) and the tensors the export hands its writer are tracked
while alive: building the policy and the reference at TP2 never holds more than one megatron
tensor's worth of checkpoint data (a whole model before), and the writer never more than one
megatron tensor's worth of exported data (a whole-model dict before). The export is the
checkpoint it was loaded from, bit for bit.
"""
from __future__ import annotations

import json
import math
import weakref

import torch

from eureka_megatron.convert.hf_io import INDEX, HFCheckpoint
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.demo import demo_config, write_tiny_checkpoint


class Live:
    """Bytes of the tracked tensors still alive, and their peak."""

    def __init__(self):
        self.now = self.peak = 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.now += n
        self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._free, n)
        return t

    def _free(self, n: int) -> None:
        self.now -= n


def rank(cfg, out_dir):
    from eureka_megatron.convert import hf_io
    from eureka_megatron.runtime.distributed import init_distributed
    from eureka_megatron.trainer.actor import Actor

    reads, written = Live(), Live()
    get, add = hf_io.HFCheckpoint.get, hf_io.ShardedSafetensorsWriter.add
    hf_io.HFCheckpoint.get = lambda self, name: reads.track(get(self, name))
    hf_io.ShardedSafetensorsWriter.add = lambda self, name, t: add(self, name, written.track(t))
    init_distributed(cfg.parallel, seed=1)
    actor = Actor(cfg, need_reference=True)
    actor.export_hf(out_dir)
    return reads.peak, written.peak


def largest_entry_bytes(hf_dir) -> int:
    """The most bytes one megatron tensor needs from the checkpoint (e.g. q + k + v)."""
    from eureka_megatron.models.registry import family_for

    ckpt = HFCheckpoint(hf_dir)
    fam = family_for(ckpt.config)
    mapping = fam.mapping(fam.config_from_hf(ckpt.config, hf_dir), fam.detect_layout(ckpt.names))
    return max(sum(math.prod(ckpt.shape(n)) * 4 for n in names)
               for *_, names in mapping.entries())


def test_load_and_export_hold_one_tensor_at_a_time(tmp_path):
    hf = write_tiny_checkpoint(tmp_path / "hf", seed=0)
    cfg = demo_config(tmp_path / "run", [f"model.hf={hf}", "parallel.nproc=2",
                                         "parallel.tensor_parallel=2", "warmup.steps=0"])
    out = tmp_path / "export"
    peaks = launch(rank, 2, cfg, out)
    ckpt = HFCheckpoint(hf)
    total = sum(math.prod(ckpt.shape(n)) * 4 for n in ckpt.names)
    largest = largest_entry_bytes(hf)
    assert largest < total / 5  # so holding the model would break the bounds below
    for read_peak, _ in peaks:
        assert 0 < read_peak <= largest
    assert 0 < peaks[0][1] <= largest  # rank 0 writes; the others hand over their shards only
    back = HFCheckpoint(out)
    assert back.names == ckpt.names and not (out / INDEX).exists()
    for name in sorted(ckpt.names):
        assert torch.equal(back.get(name), ckpt.get(name)), name
    assert json.loads((out / "config.json").read_text()) == ckpt.config
