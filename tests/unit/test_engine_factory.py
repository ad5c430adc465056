"""`rollout.factory.build_engine`, the one engine factory of the RL run and `eval`: the HF
engine's dtype is an explicit argument ("auto" is eval's bf16-on-a-GPU, fp32-on-the-CPU policy;
the RL run passes `model.rollout_dtype`)."""
import pytest
import torch

from eureka_megatron.config import load_rl_config
from eureka_megatron.rollout import factory
from eureka_megatron.trainer import engines as run_engines
from tests import rollout_fixtures as F


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2")
    F.tiny_model("qwen2", 0).save_pretrained(out)
    F.tiny_tokenizer().save_pretrained(out)
    return out


def dtype_of(engine):
    return next(engine.model.parameters()).dtype


def test_hf_dtype_is_an_argument(hf_dir):
    auto = factory.build_engine("hf", hf_dir, dtype="auto", device="cpu")
    assert dtype_of(auto) == torch.float32  # eval's policy on the CPU
    assert dtype_of(factory.build_engine("hf", hf_dir, dtype="bf16", device="cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="'vllm'"):
        factory.build_engine("vllm", hf_dir)


def test_the_rl_run_passes_its_rollout_dtype(hf_dir):
    cfg = load_rl_config(None, [f"model.hf={hf_dir}", "model.rollout_dtype=bf16"])
    engine = run_engines.build_engine(cfg, hf_dir)
    assert dtype_of(engine) == torch.bfloat16 and engine.weight_version == 0
