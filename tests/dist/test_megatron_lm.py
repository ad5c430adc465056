"""The megatron LLM train step on real gloo ranks: layout invariance and exact resume.

The reference is one TP1 run; every other layout starts from the same (layout-invariant) weights
and sees the same global batches, so loss and grad-norm must agree to fp32 round-off.
"""
import importlib
import json
import os
from pathlib import Path

import pytest

from eureka_megatron.runtime.launcher import RankError, launch
from eureka_megatron.trainer import checkpoint as ckpt
from eureka_megatron.trainer.lm_run import run_lm
from tests.helpers import rel_diff, tiny_config

TOL = 1e-6


@pytest.fixture(scope="module")
def reference():
    """6 uninterrupted steps at TP1 (untied) and 3 with tied embeddings."""
    return {
        "untied": launch(run_lm, 1, tiny_config(steps=6))[0],
        "tied": launch(run_lm, 1, tiny_config(steps=3, tie=True))[0],
    }


def assert_same(history, ref, steps=None):
    ref_by_step = {m["step"]: m for m in ref}
    assert history, "no steps ran"
    for m in history:
        r = ref_by_step[m["step"]]
        for key in ("loss", "grad_norm"):
            assert rel_diff(m[key], r[key]) < TOL, (m["step"], key, m[key], r[key])
        assert m["lr"] == pytest.approx(r["lr"], rel=1e-12)
    if steps is not None:
        assert [m["step"] for m in history] == steps


def test_reference_learns(reference):
    losses = [m["loss"] for m in reference["untied"]]
    assert losses[-1] < losses[0]
    assert all(m["update_ok"] == 1.0 for m in reference["untied"])


@pytest.mark.parametrize("name,tp,pp,vpp,nproc", [
    ("tp2", 2, 1, None, 2),
    ("pp2", 1, 2, None, 2),
    ("dp2", 1, 1, None, 2),
    ("tp2_pp2", 2, 2, None, 4),
    ("pp2_vpp2", 1, 2, 2, 2),
])
def test_layout_invariance(reference, name, tp, pp, vpp, nproc):
    history = launch(run_lm, nproc, tiny_config(tp=tp, pp=pp, vpp=vpp, nproc=nproc, steps=3))
    assert_same(history[0], reference["untied"], steps=[1, 2, 3])
    # Every rank reports the same metrics (PP broadcast, DP all-reduce).
    for other in history[1:]:
        assert_same(other, history[0])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tied_embeddings_invariance(reference, tp, pp):
    history = launch(run_lm, tp * pp, tiny_config(tp=tp, pp=pp, steps=3, tie=True))
    assert_same(history[0], reference["tied"], steps=[1, 2, 3])


def test_resume_same_layout(reference, tmp_path):
    first = launch(run_lm, 1, tiny_config(steps=3, ckpt_dir=str(tmp_path)))[0]
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000003"
    rest = launch(run_lm, 1, tiny_config(steps=6, ckpt_dir=str(tmp_path), load=str(tmp_path)))[0]
    assert_same(first + rest, reference["untied"], steps=[1, 2, 3, 4, 5, 6])


@pytest.mark.slow
def test_resume_with_async_saves(reference, tmp_path):
    """`checkpoint.async_save` at DP2: a save every step, each written while the next step
    trains; stopped after step 3, resumed to step 6 -- the uninterrupted run's losses."""
    def cfg(**kw):
        c = tiny_config(nproc=2, steps=6, ckpt_dir=str(tmp_path), save_interval=1, **kw)
        c.checkpoint.async_save, c.checkpoint.keep_last = True, 2
        return c

    first = launch(run_lm, 2, cfg(), stop_after=3)[0]
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000003"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002", "step_00000003"]
    assert not list(tmp_path.glob(".tmp-*"))
    assert json.loads((tmp_path / "step_00000003" / ckpt.COMPLETE).read_text())["async_save"]
    rest = launch(run_lm, 2, cfg(load=str(tmp_path)))[0]
    assert_same(first + rest, reference["untied"], steps=[1, 2, 3, 4, 5, 6])
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000006"


@pytest.mark.slow
def test_resume_across_layouts(reference, tmp_path):
    """Save at TP1, resume at TP2xPP2; save there, resume at DP2 -- losses stay on the reference."""
    a, b = tmp_path / "a", tmp_path / "b"
    launch(run_lm, 1, tiny_config(steps=2, ckpt_dir=str(a)))
    mid = launch(run_lm, 4, tiny_config(tp=2, pp=2, steps=4, ckpt_dir=str(b), load=str(a)))[0]
    assert_same(mid, reference["untied"], steps=[3, 4])
    info = json.loads((b / "step_00000004" / ckpt.COMPLETE).read_text())
    assert info["layout"]["tp"] == 2 and info["layout"]["pp"] == 2
    end = launch(run_lm, 2, tiny_config(nproc=2, steps=6, load=str(b)))[0]
    assert_same(end, reference["untied"], steps=[5, 6])


def _crash_while_saving(cfg, crash_step):
    """Rank function: train, but die (like a SIGKILL) after step `crash_step`'s shards are
    written and before the checkpoint is marked complete."""
    orig = ckpt.write_text_atomic

    def write(path, text):
        if path.name == ckpt.COMPLETE and json.loads(text)["step"] == crash_step:
            os._exit(9)
        orig(path, text)

    ckpt.write_text_atomic = write
    return run_lm(cfg)


def test_killed_mid_save_resumes_from_previous(reference, tmp_path):
    cfg = tiny_config(steps=4, ckpt_dir=str(tmp_path), save_interval=2)
    with pytest.raises(RankError, match="exit code 9"):
        launch(_crash_while_saving, 1, cfg, 4)
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000002"
    assert (tmp_path / ".tmp-step_00000004").is_dir()  # the half-written save, never published
    assert ckpt.resolve_checkpoint(tmp_path) == tmp_path / "step_00000002"
    rest = launch(run_lm, 1, tiny_config(steps=6, ckpt_dir=str(tmp_path), load=str(tmp_path)))[0]
    assert_same(rest, reference["untied"], steps=[3, 4, 5, 6])
    assert not (tmp_path / ".tmp-step_00000004").exists()
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000006"


def test_bf16_float16module_tracks_fp32(reference):
    """The GPU precision path (Float16Module, bf16 params, fp32 main grads) at TP1 and TP2xPP2."""
    runs = {}
    for tp, pp in [(1, 1), (2, 2)]:
        cfg = tiny_config(tp=tp, pp=pp, steps=3)
        cfg.parallel.bf16 = True
        runs[(tp, pp)] = launch(run_lm, tp * pp, cfg)[0]
    for history in runs.values():
        for m, r in zip(history, reference["untied"]):
            assert rel_diff(m["loss"], r["loss"]) < 2e-3, (m["step"], m["loss"], r["loss"])
            assert rel_diff(m["grad_norm"], r["grad_norm"]) < 5e-2


def _save_on_a_full_disk(cfg, how):
    """Rank function: train; once step 2's checkpoint is complete the disk is full -- the
    free-space check sees 1 MB (`how="check"`), or it passes and the write fails the way
    torch's writer fails on a full disk (`how="write"`)."""
    import shutil

    from megatron.core import dist_checkpointing

    run_dir, usage, save = Path(cfg.checkpoint.dir), shutil.disk_usage, dist_checkpointing.save
    full = lambda: (run_dir / ckpt.LATEST).is_file()  # noqa: E731

    def disk_usage(path):
        u = usage(path)
        return u._replace(free=1 << 20) if how == "check" and full() else u

    def write(*args, **kwargs):
        if how == "write" and full():
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return save(*args, **kwargs)

    shutil.disk_usage, dist_checkpointing.save = disk_usage, write
    return run_lm(cfg)


@pytest.mark.parametrize("how", ["check", "write"])
def test_a_full_disk_is_one_line_and_loses_nothing(reference, tmp_path, how):
    from eureka_megatron.runtime.errors import RankUserError

    cfg = tiny_config(steps=4, ckpt_dir=str(tmp_path), save_interval=2)
    with pytest.raises(RankUserError) as e:
        launch(_save_on_a_full_disk, 1, cfg, how)
    message = str(e.value)
    assert "\n" not in message and message.startswith("rank 0: ")
    intact = f"the newest complete checkpoint, {tmp_path / 'step_00000002'}, is intact"
    if how == "check":
        assert f"cannot save step 4 to {tmp_path}: it needs about " in message
        assert "MB, 1.0 MB free there; " + intact in message
    else:
        assert f"saving step 4 to {tmp_path} failed (RuntimeError: [enforce fail at " in message
        assert " free there; " + intact in message
    assert (tmp_path / ckpt.LATEST).read_text() == "step_00000002"
    assert not list(tmp_path.glob(".tmp-*"))
    if how == "check":  # (the same resume either way)
        rest = launch(run_lm, 1, tiny_config(steps=6, ckpt_dir=str(tmp_path), load=str(tmp_path)))[0]
        assert_same(rest, reference["untied"], steps=[3, 4, 5, 6])


def _run_counting(cfg, module: str, function: str):
    """Rank function: run_lm, counting the calls to megatron's `module.function` (the activation
    checkpoint of recompute, the row-parallel reduce-scatter of sequence parallelism), so a test
    of a feature cannot pass with the feature silently off."""
    owner = importlib.import_module(module)
    calls, original = [0], getattr(owner, function)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(owner, function, counted)
    return run_lm(cfg), calls[0]


@pytest.mark.parametrize("mode,tp,pp", [("full", 2, 1), ("selective", 2, 1), ("full", 2, 2)],
                         ids=["full-tp2", "selective-tp2", "full-tp2pp2"])
def test_recompute_changes_nothing_but_memory(reference, mode, tp, pp):
    """The same losses and gradient norms as the TP1 run without recompute (fp32, 1e-6)."""
    cfg = tiny_config(tp=tp, pp=pp, steps=3, recompute=mode)
    history, calls = launch(_run_counting, tp * pp, cfg, "megatron.core.tensor_parallel",
                            "checkpoint")[0]
    assert calls > 0
    assert_same(history, reference["untied"][:3], steps=[1, 2, 3])


@pytest.mark.parametrize("tp,pp,recompute", [(2, 1, "none"), (2, 2, "full")],
                         ids=["tp2", "tp2pp2-full-recompute"])
def test_sequence_parallel_changes_nothing_but_memory(reference, tp, pp, recompute):
    """The same losses and gradient norms as the TP1 run (fp32, 1e-6), the norms' gradients
    summed over TP (a missing sum changes the grad-norm); also with full recompute, whose
    backward re-runs the sequence-parallel gathers."""
    cfg = tiny_config(tp=tp, pp=pp, steps=3, sp=True, recompute=recompute)
    history, calls = launch(_run_counting, tp * pp, cfg, "megatron.core.tensor_parallel.layers",
                            "reduce_scatter_to_sequence_parallel_region")[0]
    assert calls > 0
    assert_same(history, reference["untied"][:3], steps=[1, 2, 3])
