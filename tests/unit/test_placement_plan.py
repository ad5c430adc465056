"""plan_layout: which placement-group bundle each trainer rank and rollout engine gets (no Ray)."""
import pytest

from eureka_megatron.runtime.layout import Layout, plan_layout


def plan(**kw):
    args = dict(actor_world=4, engines=2, gpus_per_engine=2, colocate=True, use_gpus=True)
    args.update(kw)
    return plan_layout(**args)


def test_colocated_engines_share_the_trainer_bundles():
    lay = plan(actor_world=4, engines=2, gpus_per_engine=2, cpus_per_bundle=4)
    assert lay == Layout(bundles=[{"GPU": 1.0, "CPU": 4.0}] * 4, actor_bundles=[0, 1, 2, 3],
                         engine_bundles=[[0, 1], [2, 3]], colocated=True, strategy="STRICT_PACK")
    assert lay.use_gpus
    one_gpu_engines = plan(engines=4, gpus_per_engine=1)
    assert one_gpu_engines.engine_bundles == [[0], [1], [2], [3]]
    assert len(one_gpu_engines.bundles) == 4


def test_disaggregated_engines_get_their_own_bundles_after_the_trainer():
    lay = plan(actor_world=4, engines=2, gpus_per_engine=2, colocate=False)
    assert lay.actor_bundles == [0, 1, 2, 3]
    assert lay.engine_bundles == [[4, 5], [6, 7]]
    assert len(lay.bundles) == 8 and not lay.colocated
    assert lay.strategy == "STRICT_PACK"  # 8 GPUs: one node
    assert set(lay.actor_bundles).isdisjoint(b for e in lay.engine_bundles for b in e)


def test_multi_node_layouts_pack_and_keep_engines_inside_a_node():
    lay = plan(actor_world=16, engines=4, gpus_per_engine=4, colocate=False)
    assert lay.strategy == "PACK" and len(lay.bundles) == 32
    assert lay.engine_bundles[0] == [16, 17, 18, 19]
    for bundles in lay.engine_bundles:
        assert len({b // 8 for b in bundles}) == 1
    # trainer on half a node, two 2-GPU engines on the other half
    half = plan(actor_world=4, engines=2, gpus_per_engine=2, colocate=False, gpus_per_node=8)
    assert half.engine_bundles == [[4, 5], [6, 7]]
    colo = plan(actor_world=16, engines=2, gpus_per_engine=8)
    assert colo.engine_bundles == [list(range(8)), list(range(8, 16))] and colo.strategy == "PACK"


def test_cpu_only_layouts():
    lay = plan(actor_world=2, engines=1, gpus_per_engine=1, colocate=False, use_gpus=False,
               cpus_per_bundle=2)
    assert lay.bundles == [{"CPU": 2.0}] * 3 and not lay.use_gpus
    assert lay.engine_bundles == [[2]] and lay.strategy == "PACK"
    default = plan_layout(actor_world=3, engines=0, gpus_per_engine=1, colocate=False, use_gpus=False)
    assert default.bundles == [{"CPU": 1.0}] * 3 and default.engine_bundles == []
    # no node rule without GPUs: CPU slots are not GPUs on a node
    plan(actor_world=3, engines=3, gpus_per_engine=1, colocate=True, use_gpus=False, gpus_per_node=2)


def test_gpu_bundles_without_cpus():
    assert plan(cpus_per_bundle=0).bundles[0] == {"GPU": 1.0}


@pytest.mark.parametrize("kw, match", [
    (dict(actor_world=0), "actor_world must be an integer >= 1"),
    (dict(engines=-1, colocate=False), "engines must be an integer >= 0"),
    (dict(gpus_per_engine=0), "gpus_per_engine must be an integer >= 1"),
    (dict(gpus_per_node=0), "gpus_per_node must be an integer >= 1"),
    (dict(actor_world=2.0), "actor_world must be an integer"),
    (dict(use_gpus=False, cpus_per_bundle=0), "cpus_per_bundle must be > 0"),
    (dict(cpus_per_bundle=-1), "cpus_per_bundle must be > 0"),
])
def test_bad_counts(kw, match):
    with pytest.raises(ValueError, match=match):
        plan(**kw)


def test_colocated_needs_engines_to_cover_the_trainer_gpus():
    with pytest.raises(ValueError, match=r"3 x 2 = 6 must equal the trainer world size 4"):
        plan(actor_world=4, engines=3, gpus_per_engine=2)
    with pytest.raises(ValueError, match=r"0 x 1 = 0 must equal the trainer world size 2"):
        plan(actor_world=2, engines=0, gpus_per_engine=1)


def test_engine_gpus_stay_on_one_node():
    with pytest.raises(ValueError, match="gpus_per_engine 3 must divide gpus_per_node 8"):
        plan(actor_world=6, engines=2, gpus_per_engine=3)
    with pytest.raises(ValueError, match="gpus_per_engine 16 must divide gpus_per_node 8"):
        plan(actor_world=16, engines=1, gpus_per_engine=16)
    # trainer on 6 GPUs leaves 2 on node 0: a 4-GPU engine would straddle nodes 0 and 1
    with pytest.raises(ValueError, match=r"engine 0 would span GPUs 6\.\.9 across nodes 0 and 1"):
        plan(actor_world=6, engines=1, gpus_per_engine=4, colocate=False)


def test_trainer_fills_whole_nodes():
    with pytest.raises(ValueError, match="multiple of gpus_per_node 8"):
        plan(actor_world=12, engines=6, gpus_per_engine=2)
    plan(actor_world=12, engines=6, gpus_per_engine=2, gpus_per_node=4)  # three 4-GPU nodes
