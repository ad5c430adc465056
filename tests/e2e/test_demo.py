"""`eureka-megatron demo` as a user gets it: the same seed gives a bit-identical run (two runs at
once, competing for the cores, with two torch threads each -- where racing reductions showed),
the demo runs from a non-editable wheel install in another directory, and its exported models
are complete HF checkpoints that transformers' own processor and model classes load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLI = [str(Path(sys.executable).parent / "eureka-megatron")]  # the installed command
TIMING = ("time/", "tokens_per_s")
# A few steps of the demo recipe; everything else (model, data, filter, rewards) as shipped.
SHORT = ["warmup.steps=4", "train.steps=3", "train.rollout_batch_size=8", "eval.interval=3",
         "eval.size=8", "data.synthetic_size=64", "output.progress=false"]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user's shell has it
    return env


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """Two demo runs of one seed started together (so they compete for the 2 cores), each with
    two torch threads (threads > 1 is where the gradient of the shared image gather raced)."""
    base = tmp_path_factory.mktemp("demo")
    runs = [base / "a", base / "b"]
    procs = [subprocess.Popen([*CLI, "demo", "--out", str(r), *SHORT, "parallel.threads=2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=ROOT, env=_env()) for r in runs]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    return runs


@pytest.mark.slow
def test_same_seed_gives_bit_identical_metrics(twin_runs):
    a, b = (_metrics(r) for r in twin_runs)
    assert [r["step"] for r in a] == [0, 1, 2, 3]
    assert "grad_norm" in a[2] and "train/entropy" in a[2] and "eval/accuracy" in a[3]
    for ra, rb in zip(a, b):
        diff = {k: (ra[k], rb.get(k)) for k in ra if ra[k] != rb.get(k)}
        assert not diff, f"step {ra['step']} differs: {diff}"
    assert a == b


def _trainer_prompt(run: Path):
    """The first held-out row as the trainer built it (ids, pixels) and the row itself."""
    from transformers import AutoTokenizer

    from eureka_megatron.data.dataset import PromptBuilder
    from eureka_megatron.data.jsonl import load_rows

    data = next((run / "data").glob("heldout-*"))
    row = load_rows(data, "auto").rows[0]
    builder = PromptBuilder("qwen2_5_vl", AutoTokenizer.from_pretrained(run / "hf_final"),
                            system_prompt=None, max_prompt_length=2048)
    return builder.build(row), row


# Run outside the source tree, as a user's script: the tree's top-level `kernels/` would shadow
# the PyPI `kernels` package that transformers' processors import.
TRANSFORMERS_SIDE = """
import importlib.util, sys, torch
from PIL import Image
from transformers import (AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor,
                          AutoTokenizer, Qwen2_5_VLProcessor)
from transformers.processing_utils import ProcessorMixin

hf_dir, image, question, out = sys.argv[1:]
if importlib.util.find_spec("torchvision") is not None:
    processor = AutoProcessor.from_pretrained(hf_dir)
else:
    # Qwen2.5-VL's processor also holds a video processor, which needs torchvision; without it
    # the real processor class is built from the checkpoint's own image processor, tokenizer and
    # chat template, skipping only the type check of the absent video processor.
    tok = AutoTokenizer.from_pretrained(hf_dir)
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = (
        lambda self, name, arg: None if name == "video_processor" and arg is None
        else check(self, name, arg))
    processor = Qwen2_5_VLProcessor(image_processor=AutoImageProcessor.from_pretrained(hf_dir),
                                    tokenizer=tok, video_processor=None,
                                    chat_template=tok.chat_template)
messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)},
                                         {"type": "text", "text": question}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt")
model = AutoModelForImageTextToText.from_pretrained(hf_dir)
ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
text = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
torch.save({**{k: v for k, v in inputs.items()}, "text": text, "model": type(model).__name__}, out)
"""


@pytest.mark.slow
def test_exported_models_are_complete_hf_checkpoints(twin_runs, tmp_path):
    run = twin_runs[0]
    for name in ("tiny_init", "stage0_hf", "hf_final"):
        files = {p.name for p in (run / name).iterdir()}
        assert {"preprocessor_config.json", "chat_template.jinja", "tokenizer.json"} <= files, name
    item, row = _trainer_prompt(run)
    out = tmp_path / "transformers.pt"
    r = subprocess.run([sys.executable, "-c", TRANSFORMERS_SIDE, str(run / "hf_final"),
                        row.images[0], row.question, str(out)], capture_output=True, text=True,
                       cwd=tmp_path, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(out)
    assert got["model"] == "Qwen2_5_VLForConditionalGeneration"
    assert got["input_ids"][0].tolist() == item.prompt.input_ids
    assert torch.equal(got["image_grid_thw"], item.prompt.mm_inputs["image_grid_thw"])
    assert torch.equal(got["pixel_values"], item.prompt.mm_inputs["pixel_values"])
    assert "<answer>" in got["text"]  # the trained format, through transformers' own generate


@pytest.mark.slow
def test_demo_runs_from_a_wheel_installed_elsewhere(tmp_path):
    """Build a wheel, install it (not editable) into a fresh venv that sees this environment's
    dependencies, and run `demo --help` and a short demo from a directory outside the tree."""
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                        str(wheels), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheel = next(wheels.glob("eureka_megatron-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch etc., not us
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                        "install", "--quiet", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    exe = str(venv / "bin" / "eureka-megatron")
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import eureka_megatron; print(eureka_megatron.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere, check=True)
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not the tree
    r = subprocess.run([exe, "demo", "--help"], capture_output=True, text=True, cwd=elsewhere,
                       env=_env(), timeout=120)
    assert r.returncode == 0 and "--out" in r.stdout, r.stderr
    r = subprocess.run([exe, "demo", "--out", "run", *SHORT], capture_output=True, text=True,
                       cwd=elsewhere, env=_env(), timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert [m["step"] for m in _metrics(elsewhere / "run")] == [0, 1, 2, 3]
    assert (elsewhere / "run" / "hf_final" / "config.json").is_file()
