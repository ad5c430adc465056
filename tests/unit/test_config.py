"""Config loading: overrides, typos and impossible layouts fail before any rank starts."""
import re

import pytest

from eureka_megatron.config import ConfigError, load_config, load_rl_config


def test_defaults_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  hidden_size: 128\ntrain:\n  steps: 5\n")
    cfg = load_config(f, ["train.steps=7", "optim.lr=3e-4", "parallel.virtual_pipeline=null"])
    assert cfg.model.hidden_size == 128 and cfg.train.steps == 7
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.parallel.virtual_pipeline is None


@pytest.mark.parametrize("overrides,message", [
    (["parallel.nproc=3", "parallel.tensor_parallel=2"], "world size parallel.nproc=3 is not divisible by TP*PP"),
    (["parallel.tensor_parallel=8", "parallel.nproc=8"], "num_attention_heads=4 is not divisible"),
    (["model.num_attention_heads=8", "parallel.tensor_parallel=4", "parallel.nproc=4"],
     "num_key_value_heads=2 (KV groups) is not divisible"),
    (["model.num_hidden_layers=3", "parallel.pipeline_parallel=2", "parallel.nproc=2"],
     "num_hidden_layers=3 is not divisible by the 2 pipeline stages"),
    (["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=4", "parallel.nproc=2"],
     "num_hidden_layers=4 is not divisible by the 8 pipeline stages"),
    (["parallel.virtual_pipeline=2"], "needs parallel.pipeline_parallel >= 2"),
    (["parallel.first_stage_layers=2"], "need pipeline_parallel >= 2"),
    (["parallel.pipeline_parallel=2", "parallel.nproc=2", "parallel.first_stage_layers=4"],
     "remaining 0 layers must divide evenly over the other 1 stages"),
    (["parallel.pipeline_parallel=3", "parallel.nproc=3", "parallel.first_stage_layers=1"],
     "remaining 3 layers must divide evenly over the other 2 stages"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "global_batch_size=6 must be divisible"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel needs parallel.tensor_parallel >= 2"),
    (["parallel.sequence_parallel=true", "parallel.tensor_parallel=2", "parallel.nproc=2",
      "train.seq_length=33"], "train.seq_length=33 must be divisible by parallel.tensor_parallel=2"),
    (["model.hidden_sise=3"], "unknown config key model.hidden_sise"),
    (["train.steps=many"], "train.steps: expected an integer"),
    (["trainsteps"], "not of the form key=value"),
])
def test_bad_layouts_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_padded_vocab_is_tp_independent():
    cfg = load_config(None, ["model.vocab_size=151655"])
    assert cfg.model.padded_vocab_size == 151680 and cfg.model.padded_vocab_size % 8 == 0


def test_uneven_pipeline_split_is_accepted():
    cfg = load_config(None, ["parallel.pipeline_parallel=3", "parallel.nproc=3",
                             "parallel.first_stage_layers=2", "model.num_hidden_layers=6"])
    assert cfg.parallel.first_stage_layers == 2


def test_algo_and_reward_defaults_are_mm_eureka():
    cfg = load_config(None, [])
    assert (cfg.algo.estimator, cfg.algo.loss, cfg.algo.clip_low, cfg.algo.dual_clip) == \
        ("grpo", "ppo", 0.2, 3.0)
    assert (cfg.algo.filter_low, cfg.algo.filter_high, cfg.algo.kl_coef) == (0.1, 0.9, 0.0)
    assert cfg.rewards.weights == {"accuracy": 1.0, "format": 0.5}
    assert cfg.rewards.functions == ["eureka_megatron.rewards:rule_based_scores"]


def test_reward_weights_and_functions_from_overrides():
    cfg = load_config(None, ["rewards.weights={accuracy: 1, format: 0.1, length: -0.5}",
                             "rewards.functions=[eureka_megatron.rewards:rule_based_scores, "
                             "mymod:length_score]", "algo.clip_high=0.28", "algo.dual_clip=null"])
    assert cfg.rewards.weights == {"accuracy": 1.0, "format": 0.1, "length": -0.5}
    assert all(isinstance(v, float) for v in cfg.rewards.weights.values())
    assert cfg.rewards.functions[1] == "mymod:length_score"
    assert cfg.algo.clip_high == 0.28 and cfg.algo.dual_clip is None


@pytest.mark.parametrize("overrides,message", [
    (["algo.estimator=ppo"], "algo.estimator='ppo' is not one of grpo"),
    (["algo.loss=dpo"], "algo.loss='dpo'"),
    (["algo.agg=mean"], "algo.agg='mean'"),
    (["algo.kl_in=advantage"], "algo.kl_in='advantage'"),
    (["algo.filter_low=0.8", "algo.filter_high=0.2"], "algo.filter_low=0.8"),
    (["algo.clip_low=1.0"], "algo.clip_low=1.0 must be in [0, 1)"),
    (["algo.dual_clip=0.5"], "algo.dual_clip=0.5 must be > 1"),
    (["algo.kl_coef=-1"], "must be >= 0"),
    (["algo.overlong_buffer=-4"], "algo.overlong_buffer=-4"),
    (["rewards.functions=[just_a_module]"], "rewards.functions[0]='just_a_module'"),
    (["rewards.functions=[]"], "at least one"),
    (["rewards.weights={accuracy: high}"], "rewards.weights.accuracy: expected a number"),
    (["rewards.weights=[1, 2]"], "rewards.weights: expected a mapping"),
    (["rewards.timeout=0"], "rewards.timeout=0.0 must be > 0"),
    (["rewards.num_workers=0"], "rewards.num_workers=0"),
    (["algo.clip=0.2"], "unknown config key algo.clip"),
])
def test_bad_algo_and_reward_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,message", [
    (["optim.overlap_param_gather=true", "optim.distributed_optimizer=false"],
     "optim.overlap_param_gather=true needs optim.distributed_optimizer=true"),
    (["optim.overlap_param_gather=true", "optim.overlap_grad_reduce=false"],
     "optim.overlap_param_gather=true needs optim.overlap_grad_reduce true or auto"),
    (["optim.overlap_grad_reduce=sometimes"],
     "optim.overlap_grad_reduce='sometimes' is not one of auto, true, false"),
    (["optim.overlap_param_gather=1"], "optim.overlap_param_gather=1 is not one of auto, true"),
    (["optim.ddp_bucket_size=0"], "optim.ddp_bucket_size=0 must be >= 1 or null"),
])
def test_bad_overlap_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):  # the RL run's too
        load_rl_config(None, ["model.hf=ckpt"] + overrides)


@pytest.mark.parametrize("grad,param,dist_opt,cpu,gpu", [
    ("auto", "auto", True, (False, False), (True, True)),
    ("auto", "auto", False, (False, False), (True, False)),  # no distributed optimizer: no gather
    ("false", "auto", True, (False, False), (False, False)),
    ("auto", "true", True, (True, True), (True, True)),  # the gather overlap brings the reduce's
    ("true", "false", True, (True, False), (True, False)),
])
def test_overlap_auto_is_on_with_cuda(grad, param, dist_opt, cpu, gpu):
    optim = load_config(None, [f"optim.overlap_grad_reduce={grad}",
                               f"optim.overlap_param_gather={param}",
                               f"optim.distributed_optimizer={str(dist_opt).lower()}"]).optim
    assert optim.overlap(cuda=False) == cpu and optim.overlap(cuda=True) == gpu


MOE = ["model.num_experts=8", "model.moe_intermediate_size=32", "model.num_experts_per_tok=2"]


def test_expert_parallel_keys_from_yaml_and_overrides(tmp_path):
    f = tmp_path / "moe.yaml"
    f.write_text("model:\n  num_experts: 8\n  moe_intermediate_size: 32\n"
                 "parallel:\n  expert_parallel: 2\n  nproc: 4\n")
    cfg = load_config(f, ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                          "parallel.expert_tensor_parallel=1", "model.moe_aux_loss_coeff=1e-3"])
    p = cfg.parallel
    assert (p.expert_parallel, p.etp, p.expert_dp, p.dp) == (2, 1, 2, 2)
    assert cfg.model.moe_aux_loss_coeff == pytest.approx(1e-3)
    assert p.describe() == "TP2 x PP1 x DP2 = 4 ranks (sequence parallel); experts EP2 x ETP1 x EDP2"
    dense = load_config(None, [])
    assert dense.parallel.etp == 1 and "experts" not in dense.parallel.describe()
    assert dense.model.num_experts == 0 and dense.model.moe_aux_loss_coeff == 0.0
    rl = load_rl_config(None, ["model.hf=ckpt", "model.moe_aux_loss_coeff=0.01",
                               "parallel.expert_parallel=2", "parallel.nproc=2"])
    assert rl.model.moe_aux_loss_coeff == 0.01 and rl.parallel.expert_parallel == 2


@pytest.mark.parametrize("overrides,message", [
    (["parallel.expert_parallel=2", "parallel.nproc=2"],
     "parallel.expert_parallel=2 needs a Mixture-of-Experts model (model.num_experts > 0)"),
    (MOE[1:] + ["model.num_experts=6", "parallel.expert_parallel=4", "parallel.nproc=4"],
     "model.num_experts=6 is not divisible by parallel.expert_parallel=4"),
    (MOE + ["parallel.expert_parallel=2", "parallel.nproc=3"],
     "world size parallel.nproc=3 is not divisible by parallel.expert_tensor_parallel * "
     "parallel.expert_parallel * parallel.pipeline_parallel = 1*2*1 = 2"),
    (MOE + ["parallel.expert_parallel=2", "parallel.tensor_parallel=2", "parallel.nproc=2",
            "parallel.sequence_parallel=true"], "= 2*2*1 = 4 (megatron's expert layout; "
                                                "expert_tensor_parallel defaults to tensor_parallel)"),
    (MOE + ["parallel.expert_parallel=0"], "parallel.expert_parallel must be >= 1, got 0"),
    (MOE + ["parallel.expert_tensor_parallel=true"], "parallel.expert_tensor_parallel: expected an integer"),
    (MOE + ["parallel.expert_tensor_parallel=3", "parallel.nproc=3"],
     "model.moe_intermediate_size=32 is not divisible by the expert tensor parallel size 3"),
    (MOE + ["parallel.tensor_parallel=2", "parallel.nproc=2"],
     "needs parallel.sequence_parallel=true"),
    (MOE + ["model.num_experts_per_tok=9"], "model.num_experts_per_tok=9 must be in [1, model.num_experts=8]"),
    (MOE + ["model.moe_aux_loss_coeff=-1"], "model.moe_aux_loss_coeff=-1.0 must be >= 0"),
])
def test_bad_expert_layouts_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
