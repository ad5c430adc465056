"""A damaged checkpoint is rejected up front with the damaged file's name -- never a hang."""
import shutil

import pytest

from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer import checkpoint as ckpt
from eureka_megatron.trainer.lm_run import run_lm
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    launch(run_lm, 1, tiny_config(steps=1, ckpt_dir=str(run)))
    return run


@pytest.fixture
def run_copy(saved, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(saved, dst)
    return dst


def test_valid_checkpoint_resolves(run_copy):
    step = ckpt.resolve_checkpoint(run_copy)
    assert step == run_copy / "step_00000001"
    assert ckpt.resolve_checkpoint(step) == step


def test_missing_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


def test_latest_points_nowhere(run_copy):
    (run_copy / "latest").write_text("step_00000099")
    with pytest.raises(ckpt.CheckpointError, match="step_00000099, which does not exist"):
        ckpt.resolve_checkpoint(run_copy)


def test_unfinished_save(run_copy):
    (run_copy / "step_00000001" / ckpt.COMPLETE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="complete.json is missing"):
        ckpt.resolve_checkpoint(run_copy)


def test_truncated_shard_is_named(run_copy):
    shard = sorted((run_copy / "step_00000001").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=f"{shard.name} is truncated"):
        ckpt.resolve_checkpoint(run_copy)


def test_missing_shard_is_named(run_copy):
    shard = sorted((run_copy / "step_00000001").glob("*.distcp"))[0]
    shard.unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{shard.name} is missing"):
        ckpt.resolve_checkpoint(run_copy)


def test_corrupt_metadata(run_copy):
    (run_copy / "step_00000001" / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ckpt.CheckpointError, match=".metadata cannot be read"):
        ckpt.resolve_checkpoint(run_copy)
