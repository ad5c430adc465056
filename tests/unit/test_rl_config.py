"""RL config: the Ray launcher's GPU plan (trainer ranks + SGLang engines) is refused at load, so
`train --dry-run` catches what the cluster would refuse only after it started."""
import pytest

from eureka_megatron.config import ConfigError
from eureka_megatron.config import load_rl_config

RAY_SGLANG = ["model.hf=ckpt", "cluster.launcher=ray", "rollout.engine=sglang"]


@pytest.mark.parametrize("overrides,message", [
    (["parallel.nproc=8", "rollout.engines=3", "rollout.gpus_per_engine=2"],
     "engines x gpus_per_engine = 3 x 2 = 6 must equal the trainer world size 8"),
    (["parallel.nproc=6", "rollout.engines=2", "rollout.gpus_per_engine=3"],
     "gpus_per_engine 3 must divide gpus_per_node 8"),
    (["parallel.nproc=12", "rollout.engines=3", "rollout.gpus_per_engine=4"],
     "a trainer world of 12 GPUs spans nodes"),
    (["parallel.nproc=6", "rollout.engines=1", "rollout.gpus_per_engine=4", "cluster.colocate=false"],
     "engine 0 would span GPUs 6..9 across nodes 0 and 1"),
    (["parallel.nproc=8", "rollout.engines=1", "rollout.gpus_per_engine=0"],
     "gpus_per_engine must be an integer >= 1"),
])
def test_unplaceable_ray_layouts_fail_at_load(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_rl_config(None, RAY_SGLANG + overrides)
    assert message in str(e.value) and "cluster layout (parallel.nproc=" in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["parallel.nproc=8", "rollout.engines=4", "rollout.gpus_per_engine=2"],                 # 7B recipe
    ["parallel.nproc=32", "rollout.engines=4", "rollout.gpus_per_engine=4",
     "cluster.colocate=false"],                                                              # 32B recipe
    ["parallel.nproc=4", "rollout.engines=2", "rollout.gpus_per_engine=2", "cluster.colocate=false"],
])
def test_placeable_ray_layouts_load(overrides):
    load_rl_config(None, RAY_SGLANG + overrides)


def test_layouts_the_ray_launcher_does_not_place_are_not_checked():
    # the HF engine lives in rank 0's process; the local launcher places nothing
    load_rl_config(None, ["model.hf=ckpt", "cluster.launcher=ray", "parallel.nproc=2",
                          "rollout.engines=3"])
    load_rl_config(None, ["model.hf=ckpt", "rollout.engine=sglang", "parallel.nproc=2",
                          "rollout.engines=3"])
