"""Every config in examples/ dry-runs through the CLI against the real hub config.json of its model,
with the layout its header promises; the numbers in the recipes' memory arithmetic follow from the
config values; and the launch scripts parse, refuse missing paths and submit the right command."""
import importlib.util
import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from eureka_megatron import cli
from eureka_megatron.bench.convert import (INTERNVL2_5_38B, INTERNVL3_5_38B, QWEN2_5_VL_7B,
                                           QWEN2_5_VL_32B, QWEN3_VL_8B, QWEN3_VL_30B_A3B,
                                           QWEN3_VL_32B, QWEN3_VL_235B_A22B, write_config_dir)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

# recipe -> (hub config, TP, PP, DP, engines, GPUs per engine, colocated, GPUs in all)
RECIPES = {
    "qwen2_5_vl_7b": (QWEN2_5_VL_7B, 2, 1, 4, 4, 2, True, 8),
    "qwen2_5_vl_32b": (QWEN2_5_VL_32B, 8, 2, 2, 4, 4, False, 48),
    "internvl2_5_38b": (INTERNVL2_5_38B, 8, 2, 2, 4, 8, True, 32),
    "qwen3_vl_32b": (QWEN3_VL_32B, 8, 2, 2, 4, 4, False, 48),
    "qwen3_vl_235b_a22b": (QWEN3_VL_235B_A22B, 4, 4, 8, 4, 8, False, 160),
}


def _model_dir(tmp_path: Path, hub: dict) -> Path:
    return write_config_dir(tmp_path / "hf", hub)


def _rows(tmp_path: Path) -> Path:
    f = tmp_path / "train.jsonl"
    f.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n'
                 '{"question": "What is 2 + 3?", "answer": "5"}\n')
    return f


def _dry_run(capsys, *argv) -> str:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cluster_recipe_dry_run_shows_its_layout(name, tmp_path, capsys):
    hub, tp, pp, dp, engines, gpe, colocated, gpus = RECIPES[name]
    out = _dry_run(capsys, "train", str(EXAMPLES / f"{name}.yaml"),
                   f"model.hf={_model_dir(tmp_path, hub)}", f"data.train={_rows(tmp_path)}",
                   f"output.dir={tmp_path / 'run'}", "--dry-run")
    actor = next(line for line in out.splitlines() if line.startswith("actor"))
    assert f"TP{tp} x PP{pp} x DP{dp} = {tp * pp * dp} ranks" in actor and "(ray launcher)" in actor
    where = "colocated" if colocated else "disaggregated"
    assert f"sglang engine x{engines} of TP{gpe}" in out and f"{where}, {gpus} GPUs in all" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_header_is_the_planners_table(name, tmp_path, capsys):
    """The header names the layout the config has, and its memory table is what `--dry-run`
    prints for it (the planner, not hand arithmetic): it fits the GPU."""
    hub, tp, pp, dp, engines, gpe, colocated, _ = RECIPES[name]
    text = (EXAMPLES / f"{name}.yaml").read_text()
    header = " ".join(" ".join(line.lstrip("#").split()) for line in text.splitlines()
                      if line.startswith("#"))  # the comment block as one line
    cfg = yaml.safe_load(text)
    p, r, t = cfg["parallel"], cfg["rollout"], cfg["train"]
    assert (p["tensor_parallel"], p["pipeline_parallel"], p["nproc"] // (tp * pp)) == (tp, pp, dp)
    assert (r["engines"], r["gpus_per_engine"], cfg["cluster"]["colocate"]) == (engines, gpe, colocated)
    assert ("COLOCATED" if colocated else "DISAGGREGATED") in header
    assert f"TP{tp} x PP{pp} x DP{dp}" in header
    assert f"{engines} SGLang engines" in header and f"TP{gpe}" in header
    assert t["micro_batch_tokens"] >= cfg["data"]["max_prompt_length"] + r["max_new_tokens"]
    assert t["rollout_batch_size"] * r["n_samples"] % t["mini_batches"] == 0

    out = _dry_run(capsys, "train", str(EXAMPLES / f"{name}.yaml"),
                   f"model.hf={_model_dir(tmp_path, hub)}", f"data.train={_rows(tmp_path)}",
                   f"output.dir={tmp_path / 'run'}", "--dry-run")
    table = out[out.index("memory per GPU"):].rstrip("\n").splitlines()
    assert ": fits (" in table[-1]
    recipe_memory = _tool("recipe_memory")
    assert text == recipe_memory.with_table(text, "\n".join(table)), \
        f"examples/{name}.yaml: stale memory table; run python tools/recipe_memory.py"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_config_dry_run(tmp_path, capsys):
    from eureka_megatron.trainer.demo import tiny_qwen2_5_vl_config

    hf = tmp_path / "tiny"
    hf.mkdir()
    (hf / "config.json").write_text(tiny_qwen2_5_vl_config().to_json_string())
    out = _dry_run(capsys, "train", str(EXAMPLES / "demo_cpu.yaml"), f"model.hf={hf}",
                   f"output.dir={tmp_path / 'run'}", "--dry-run")
    assert "TP1 x PP1 x DP1 = 1 ranks (local launcher)" in out and "hf engine x1" in out


def test_tiny_lm_config_dry_run(tmp_path, capsys):
    out = _dry_run(capsys, "train-lm", str(EXAMPLES / "tiny_lm.yaml"),
                   f"checkpoint.dir={tmp_path / 'ck'}", "--dry-run")
    assert "layout: TP1 x PP1 x DP1 = 1 ranks" in out


def test_every_example_config_is_covered():
    names = {p.stem for p in EXAMPLES.glob("*.yaml")}
    assert names == set(RECIPES) | {"demo_cpu", "tiny_lm"}
    assert {p.stem for p in (EXAMPLES / "mm_eureka").glob("*.yaml")} == set(MM_EUREKA)


# --- MM-Eureka's releases, exactly -------------------------------------------------------------

# OpenGVLab/InternVL2_5-8B config.json (the fields our reader uses): InternLM2.5-7B +
# InternViT-300M-448px-V2_5 (models-and-conversion.md section 1); <IMG_CONTEXT> is id 92546.
INTERNVL2_5_8B = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
    "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "template": "internvl2_5",
    "force_image_size": 448, "torch_dtype": "bfloat16",
    "llm_config": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                   "vocab_size": 92553, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-5, "rope_theta": 1000000, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False, "bias": False, "torch_dtype": "bfloat16"},
    "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                      "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
                      "qkv_bias": True, "qk_normalization": False, "image_size": 448,
                      "patch_size": 14, "num_channels": 3, "hidden_act": "gelu",
                      "torch_dtype": "bfloat16"},
}
INTERNLM2_TOKENIZER = {"added_tokens_decoder": {"92546": {"content": "<IMG_CONTEXT>",
                                                          "special": True}}}

# From MM-Eureka's scripts (shared/reference/mm-eureka.md, "Hyper-parameters in the scripts" and
# the defaults they do not override): estimator, lr, weight decay, warm-up ratio, episodes x
# prompts, train batch (sequences), prompt / generation length, online filter, KL, loss,
# aggregation (token mean only with --use_dapo or CPGD), reward weights.
MM_EUREKA = {
    # prompt_len: theirs 2048; SGLang tiles InternLM2 InternVL images up to 12 + thumbnail (3328)
    "internvl_8b_rloo": dict(hub=INTERNVL2_5_8B, estimator="rloo", lr=3e-7, wd=0.0, warmup=0.03,
                             prompts=54_931, episodes=1, train_batch=64, prompt_len=4096,
                             filter=None, loss="ppo", agg="seq-mean-token-mean",
                             weights={"accuracy": 1.0, "format": 0.5}, projector=True,
                             colocated=True, gpus=8),
    "internvl_38b_zero": dict(hub=INTERNVL2_5_38B, estimator="rloo", lr=3e-7, wd=0.0,
                              warmup=0.03, prompts=9_300, episodes=1, train_batch=64,
                              prompt_len=2048, filter=None, loss="ppo",
                              agg="seq-mean-token-mean", weights={"accuracy": 1.0, "format": 1.0},
                              projector=True, colocated=False, gpus=40),
    "qwen_7b_grpo": dict(hub=QWEN2_5_VL_7B, estimator="grpo", lr=1e-6, wd=0.0, warmup=0.03,
                         prompts=15_616, episodes=10, train_batch=128, prompt_len=3000,
                         filter=(0.1, 0.9), loss="ppo", agg="seq-mean-token-mean",
                         weights={"accuracy": 1.0, "format": 0.5}, projector=None,
                         colocated=True, gpus=8),
    "cpgd_7b": dict(hub=QWEN2_5_VL_7B, estimator="grpo", lr=1e-6, wd=0.01, warmup=0.0,
                    prompts=15_616, episodes=5, train_batch=128, prompt_len=3000, filter=None,
                    loss="cpgd", agg="token-mean", weights={"accuracy": 1.0, "format": 0.5},
                    projector=None, colocated=True, gpus=8),
}


@pytest.mark.parametrize("name", sorted(MM_EUREKA))
def test_mm_eureka_release_configs_carry_their_settings(name, tmp_path, capsys):
    want = MM_EUREKA[name]
    path = EXAMPLES / "mm_eureka" / f"{name}.yaml"
    hub = want["hub"]
    model = _model_dir(tmp_path, hub)
    if hub is INTERNVL2_5_8B:
        (model / "tokenizer_config.json").write_text(json.dumps(INTERNLM2_TOKENIZER))
    out = _dry_run(capsys, "train", str(path), f"model.hf={model}",
                   f"data.train={_rows(tmp_path)}", f"output.dir={tmp_path / 'run'}", "--dry-run")
    where = "colocated" if want["colocated"] else "disaggregated"
    assert f"{where}, {want['gpus']} GPUs in all" in out
    cfg = cli_config(path, model, tmp_path)
    a, o, t, r, d = cfg.algo, cfg.optim, cfg.train, cfg.rollout, cfg.data
    assert (a.estimator, a.loss, a.agg, a.kl_coef) == (want["estimator"], want["loss"],
                                                       want["agg"], 0.0)
    assert a.whiten == (want["estimator"] == "rloo")  # OpenRLHF whitens all but group_norm
    if want["estimator"] == "grpo":
        assert a.grpo_eps == 1e-9
    assert (a.clip_low, a.clip_high) == (0.2, 0.2)
    assert a.dual_clip == (None if want["loss"] == "cpgd" else 3.0)
    if want["filter"]:
        assert a.online_filter and (a.filter_low, a.filter_high) == want["filter"]
    else:
        assert not a.online_filter and r.max_filter_rounds == 1
    assert (o.lr, o.min_lr, o.weight_decay) == pytest.approx((want["lr"], want["lr"] / 10,
                                                              want["wd"]))
    assert (o.adam_beta1, o.adam_beta2, o.clip_grad) == (0.9, 0.95, 1.0)
    assert t.rollout_batch_size == 128 and r.n_samples == 8 and t.epochs == 1
    assert t.mini_batches == 128 * 8 // want["train_batch"]
    assert t.steps == math.ceil(want["episodes"] * want["prompts"] / 128)
    opt_steps = t.steps * t.mini_batches
    assert o.warmup_steps == math.ceil(want["warmup"] * opt_steps) or \
        o.warmup_steps == int(want["warmup"] * opt_steps)
    assert (r.temperature, r.top_p, r.max_new_tokens) == (1.0, 1.0, 4096)
    assert d.max_prompt_length == want["prompt_len"]
    assert cfg.rewards.weights == want["weights"]
    assert cfg.model.freeze_vision and cfg.model.freeze_projector is (
        None if want["projector"] is None else not want["projector"])
    if name.endswith("zero"):
        assert cfg.rewards.functions == ["eureka_megatron.rewards:zero_scores"]
        assert d.system_prompt == "r1-zero"


def cli_config(path: Path, model: Path, tmp_path: Path):
    from eureka_megatron.config import load_rl_config

    return load_rl_config(str(path), [f"model.hf={model}", f"data.train={_rows(tmp_path)}"])


# --- launch scripts ------------------------------------------------------------------------------

SCRIPTS = sorted(EXAMPLES.rglob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _run_script(script: str, tmp_path: Path, **env):
    """The launch script with `ray` and the CLI replaced by stubs that print their arguments."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "ray").write_text('#!/usr/bin/env bash\necho "RAY $*"\n')
    (stubs / "ray").chmod(0o755)
    full = {k: v for k, v in os.environ.items()
            if k not in ("MODEL", "DATA", "EVAL_DATA", "RUN_DIR", "MODE", "DRY_RUN", "GPUS_PER_NODE",
                         "NET_IF", "RAY_ADDRESS")}
    full.update(PATH=f"{stubs}:{full['PATH']}", EUREKA_MEGATRON="echo CLI", **env)
    return subprocess.run(["bash", str(EXAMPLES / "launch" / script)], capture_output=True,
                          text=True, env=full, cwd=tmp_path, timeout=30)


@pytest.mark.parametrize("script", ["qwen2_5_vl_7b.sh", "qwen2_5_vl_32b.sh", "internvl2_5_38b.sh",
                                    "qwen3_vl_32b.sh", "qwen3_vl_235b_a22b.sh"])
def test_launch_script_names_what_is_missing(script, tmp_path):
    r = _run_script(script, tmp_path)
    assert r.returncode == 2 and "MODEL is not set" in r.stderr
    r = _run_script(script, tmp_path, MODEL=str(tmp_path))
    assert r.returncode == 2 and "has no config.json" in r.stderr
    (tmp_path / "config.json").write_text("{}")
    r = _run_script(script, tmp_path, MODEL=str(tmp_path))
    assert r.returncode == 2 and "DATA is not set" in r.stderr
    r = _run_script(script, tmp_path, MODEL=str(tmp_path), DATA="missing.jsonl")
    assert r.returncode == 2 and f"DATA={tmp_path}/missing.jsonl does not exist" in r.stderr


def test_launch_script_dry_runs_then_submits_to_ray(tmp_path):
    hf = _model_dir(tmp_path, QWEN2_5_VL_32B)
    rows = _rows(tmp_path)
    env = dict(MODEL="hf", DATA=rows.name)  # relative to the caller's directory
    r = _run_script("qwen2_5_vl_32b.sh", tmp_path, **env)
    assert r.returncode == 2 and "RUN_DIR is not set" in r.stderr  # a cluster run needs shared storage
    r = _run_script("qwen2_5_vl_32b.sh", tmp_path, RUN_DIR="runs/x", **env)
    assert r.returncode == 0, r.stderr
    args = f"model.hf={hf} data.train={rows} eval.interval=0 output.dir={tmp_path}/runs/x"
    lines = r.stdout.splitlines()
    assert f"CLI train examples/qwen2_5_vl_32b.yaml {args} --dry-run" in lines
    submit = [x for x in lines if x.startswith("RAY ")]
    assert len(submit) == 1 and submit[0].startswith("RAY job submit --working-dir .")
    assert re.search(r"-- eureka-megatron train examples/qwen2_5_vl_32b.yaml cluster.launcher=ray "
                     rf"cluster.address=auto cluster.gpus_per_node=8 {re.escape(args)}$", submit[0])


def test_7b_launch_script_runs_on_this_node(tmp_path):
    _model_dir(tmp_path, QWEN2_5_VL_7B)
    _rows(tmp_path)
    r = _run_script("qwen2_5_vl_7b.sh", tmp_path, MODEL="hf", DATA="train.jsonl",
                    EVAL_DATA="train.jsonl")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("CLI ")]
    assert len(lines) == 2 and lines[0] == lines[1] + " --dry-run"
    assert f"eval.data={tmp_path}/train.jsonl" in lines[1]
    assert f"output.dir={REPO}/runs/qwen2_5_vl_7b" in lines[1]
    assert not any(x.startswith("RAY ") for x in r.stdout.splitlines())


# today's models' hub configs through the recipes of their size (the 32B and 235B-A22B recipes
# dry-run above): the family reads the published config.json, the layout validates, the plan fits
HUB_DRY_RUNS = {
    "qwen3_vl_8b": (QWEN3_VL_8B, "qwen2_5_vl_7b", ["parallel.tensor_parallel=4",
                                                   "rollout.gpus_per_engine=4", "rollout.engines=2"],
                    "TP4 x PP1 x DP2 = 8 ranks"),
    "qwen3_vl_30b_a3b": (QWEN3_VL_30B_A3B, "qwen3_vl_235b_a22b", [
        "parallel.tensor_parallel=2", "parallel.pipeline_parallel=1", "parallel.nproc=16",
        "parallel.first_stage_layers=null", "parallel.last_stage_layers=null",
        "parallel.expert_parallel=8", "rollout.gpus_per_engine=2", "rollout.engines=4"],
        "experts EP8 x ETP1 x EDP2"),
    "internvl3_5_38b": (INTERNVL3_5_38B, "internvl2_5_38b", [], "TP8 x PP2 x DP2 = 32 ranks"),
}


@pytest.mark.parametrize("name", sorted(HUB_DRY_RUNS))
def test_todays_hub_configs_dry_run(name, tmp_path, capsys):
    hub, recipe, overrides, layout = HUB_DRY_RUNS[name]
    out = _dry_run(capsys, "train", str(EXAMPLES / f"{recipe}.yaml"),
                   f"model.hf={_model_dir(tmp_path, hub)}", f"data.train={_rows(tmp_path)}",
                   f"output.dir={tmp_path / 'run'}", *overrides, "--dry-run")
    assert f"model        {hub['model_type']} from" in out and layout in out
    assert ": fits (" in out.splitlines()[-1]
