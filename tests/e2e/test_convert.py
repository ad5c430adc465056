"""The converter and `forward` commands on real files, against transformers.

HF dir (save_pretrained) -> `convert hf-to-megatron` -> `forward --tp/--pp` (megatron's own
dist_checkpointing loads the directory at that layout) must give transformers' logits; then
`convert megatron-to-hf` must give back the source tensors bit for bit, in the source's naming,
with its side files, loadable by transformers. Bad inputs fail with a clear message and leave
nothing behind.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from eureka_megatron.cli import main
from tests.dist.test_qwen2_5_vl import GRIDS, IMAGE, batch, hf_model, our_config


def hf_tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def convert(*args) -> int:
    return main(["convert", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def qwen_vl_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL saved by transformers in two shards, plus its reference logits."""
    d = tmp_path_factory.mktemp("hf") / "qwen2_5_vl"
    model = hf_model(our_config())
    model.save_pretrained(d, max_shard_size="600KB")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
    (d / "chat_template.jinja").write_text("{{ messages }}")
    input_ids, pixels = batch()
    mask = torch.ones_like(input_ids)
    mask[1, :3] = 0  # left padding in the second row
    inputs = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixels,
              "image_grid_thw": GRIDS}
    with torch.no_grad():
        ref = model(**inputs, mm_token_type_ids=(input_ids == IMAGE).int()).logits.float()
    torch.save(inputs, d.parent / "in.pt")
    return d, ref, mask.bool()


def test_qwen2_5_vl_convert_forward_and_back(qwen_vl_dir, tmp_path):
    src, ref, keep = qwen_vl_dir
    assert len(list(src.glob("*.safetensors"))) > 1  # the index path is exercised
    mg, back = tmp_path / "mg", tmp_path / "back"
    assert convert("hf-to-megatron", "--hf", src, "--out", mg) == 0
    info = json.loads((mg / "conversion.json").read_text())
    assert info["layout"] == "disk" and info["family"] == "qwen2_5_vl"

    for tp, pp, engine in ((2, 1, []), (1, 2, []), (2, 2, ["--engine", "hf"])):
        out = tmp_path / f"logits_tp{tp}_pp{pp}{'_engine' if engine else ''}.pt"
        assert main(["forward", "--megatron", str(mg), "--inputs", str(src.parent / "in.pt"),
                     "--out", str(out), "--tp", str(tp), "--pp", str(pp), *engine]) == 0
        logits = torch.load(out)["logits"]
        assert logits.shape == ref.shape and logits.dtype == torch.float32
        rel = (logits - ref)[keep].abs().max() / ref[keep].abs().max()
        assert rel < 1e-5, (tp, pp, float(rel))

    assert convert("megatron-to-hf", "--megatron", mg, "--out", back) == 0
    a, b = hf_tensors(src), hf_tensors(back)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for side in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (back / side).read_bytes() == (src / side).read_bytes(), side

    from transformers import Qwen2_5_VLForConditionalGeneration

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(back, attn_implementation="eager")
    inputs = torch.load(src.parent / "in.pt")
    with torch.no_grad():
        again = reloaded(**inputs, mm_token_type_ids=(inputs["input_ids"] == IMAGE).int()).logits
    assert torch.equal(again.float(), ref)


def test_in_memory_layout_and_dtype(qwen_vl_dir, tmp_path):
    """transformers >= 4.52 in-memory names are read and written back as such; --dtype casts."""
    src, _, _ = qwen_vl_dir
    mem = tmp_path / "mem"
    shutil.copytree(src, mem, ignore=shutil.ignore_patterns("*.safetensors*"))
    sd = {k.replace("visual.", "model.visual.", 1) if k.startswith("visual.") else
          k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k: v
          for k, v in hf_tensors(src).items()}
    save_file(sd, str(mem / "model.safetensors"), metadata={"format": "pt"})
    assert convert("hf-to-megatron", "--hf", mem, "--out", tmp_path / "mg", "--dtype", "bf16") == 0
    assert json.loads((tmp_path / "mg" / "conversion.json").read_text())["layout"] == "memory"
    assert convert("megatron-to-hf", "--megatron", tmp_path / "mg", "--out", tmp_path / "back") == 0
    back = hf_tensors(tmp_path / "back")
    assert set(back) == set(sd)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], sd[k].to(torch.bfloat16))
               for k in sd)


def _broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs_fail_clearly_and_write_nothing(qwen_vl_dir, tmp_path, capsys):
    src, _, _ = qwen_vl_dir
    out = tmp_path / "out"

    unsupported = _broken_copy(src, tmp_path / "llava")
    cfg = json.loads((unsupported / "config.json").read_text())
    (unsupported / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    assert convert("hf-to-megatron", "--hf", unsupported, "--out", out) == 2
    err = capsys.readouterr().err
    assert "'llava' is not supported" in err and "qwen2_5_vl" in err and "internvl_chat" in err

    missing = _broken_copy(src, tmp_path / "missing")
    shard = sorted(missing.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert convert("hf-to-megatron", "--hf", missing, "--out", out) == 2
    assert shard.name in capsys.readouterr().err

    mismatch = _broken_copy(src, tmp_path / "mismatch")
    cfg = json.loads((mismatch / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 128
    (mismatch / "config.json").write_text(json.dumps(cfg))
    assert convert("hf-to-megatron", "--hf", mismatch, "--out", out) == 2
    err = capsys.readouterr().err
    assert "config does not match the weights" in err and "linear_fc1" in err

    extra = _broken_copy(src, tmp_path / "extra")
    save_file({"model.mystery.weight": torch.zeros(2)}, str(extra / "model.safetensors"))
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.mystery.weight"] = "model.safetensors"
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert("hf-to-megatron", "--hf", extra, "--out", out) == 2
    assert "have no mapping: model.mystery.weight" in capsys.readouterr().err

    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_refuses_to_overwrite(qwen_vl_dir, tmp_path, capsys):
    src, _, _ = qwen_vl_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert("hf-to-megatron", "--hf", src, "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_qwen2_tied_text_model(tmp_path):
    """A tied Qwen2.5 text model (no lm_head.weight on disk, as 0.5B-3B ship) converts, runs at
    TP2 and comes back without a spurious lm_head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    src = tmp_path / "qwen2"
    model.save_pretrained(src)
    assert "lm_head.weight" not in hf_tensors(src)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, tmp_path / "in.pt")
    with torch.no_grad():
        ref = model(ids).logits
    assert convert("hf-to-megatron", "--hf", src, "--out", tmp_path / "mg") == 0
    assert main(["forward", "--megatron", str(tmp_path / "mg"), "--inputs", str(tmp_path / "in.pt"),
                 "--out", str(tmp_path / "out.pt"), "--tp", "2"]) == 0
    logits = torch.load(tmp_path / "out.pt")["logits"]
    assert (logits - ref).abs().max() / ref.abs().max() < 1e-5
    assert main(["forward", "--megatron", str(tmp_path / "mg"), "--inputs", str(tmp_path / "in.pt"),
                 "--out", str(tmp_path / "engine.pt"), "--tp", "2", "--engine", "hf"]) == 0
    synced = torch.load(tmp_path / "engine.pt")["logits"]  # tied embeddings through the sync
    assert (synced - ref).abs().max() / ref.abs().max() < 1e-5
    assert convert("megatron-to-hf", "--megatron", tmp_path / "mg", "--out", tmp_path / "back") == 0
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,tp,pp", [("vit6b", 2, 1), ("internlm2", 1, 2)],
                         ids=["native_qknorm_padded_heads_tp2", "chat_internlm2_pp2"])
def test_internvl_convert_forward_and_back(name, tp, pp, tmp_path):
    """InternVL through the commands: the HF-native format (a qk-norm tower whose 5 heads are
    padded to 8, so TP2 works) and the original internvl_chat format with an InternLM2 LLM."""
    from tests.dist.test_internvl import (IMAGE as IMG, batch as vl_batch, chat_config_json,
                                          chat_state_dict, hf_model as internvl_hf,
                                          our_config as internvl_config, reference)

    cfg = internvl_config(name)
    model = internvl_hf(cfg)
    src = tmp_path / "src"
    if name == "internlm2":  # the original format, written by the test's own converter
        src.mkdir()
        save_file(chat_state_dict(model.state_dict(), cfg), str(src / "model.safetensors"),
                  metadata={"format": "pt"})
        (src / "config.json").write_text(json.dumps(chat_config_json(cfg)))
        (src / "tokenizer_config.json").write_text(json.dumps(
            {"added_tokens_decoder": {str(IMG): {"content": "<IMG_CONTEXT>", "special": True}}}))
    else:
        model.save_pretrained(src)
    input_ids, pixels, _ = vl_batch()
    ref, _ = reference(model, input_ids, pixels)
    torch.save({"input_ids": input_ids, "pixel_values": pixels}, tmp_path / "in.pt")

    assert convert("hf-to-megatron", "--hf", src, "--out", tmp_path / "mg") == 0
    assert main(["forward", "--megatron", str(tmp_path / "mg"), "--inputs", str(tmp_path / "in.pt"),
                 "--out", str(tmp_path / "out.pt"), "--tp", str(tp), "--pp", str(pp)]) == 0
    logits = torch.load(tmp_path / "out.pt")["logits"]
    assert (logits - ref).abs().max() / ref.abs().max() < 1e-5
    assert convert("megatron-to-hf", "--megatron", tmp_path / "mg", "--out", tmp_path / "back") == 0
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_qwen3_moe_convert_forward_at_ep_and_back(tmp_path, capsys):
    """Qwen3-MoE through the commands: per-expert tensors on disk -> megatron -> forward with the
    experts over TP2 x EP2 (13 tokens: padded for sequence parallelism) -> the HF engine after a
    sync at EP2 -> back to HF bit for bit; an EP the experts do not divide is
    refused before any rank starts, naming the key."""
    from tests.dist.test_moe import VOCAB, hf_model as moe_hf

    model = moe_hf()
    src = tmp_path / "src"
    model.save_pretrained(src)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    torch.save({"input_ids": ids}, tmp_path / "in.pt")
    with torch.no_grad():
        ref = model(ids).logits
    assert convert("hf-to-megatron", "--hf", src, "--out", tmp_path / "mg") == 0
    for extra in (["--tp", "2", "--ep", "2"], ["--ep", "2", "--engine", "hf"]):
        out = tmp_path / f"out{'_'.join(extra)}.pt"
        assert main(["forward", "--megatron", str(tmp_path / "mg"), "--inputs",
                     str(tmp_path / "in.pt"), "--out", str(out), *extra]) == 0, extra
        logits = torch.load(out)["logits"]
        assert logits.shape == ref.shape, extra
        assert (logits - ref).abs().max() / ref.abs().max() < 1e-5, extra
    assert "EP2" in capsys.readouterr().out
    assert main(["forward", "--megatron", str(tmp_path / "mg"), "--inputs", str(tmp_path / "in.pt"),
                 "--out", str(tmp_path / "bad.pt"), "--ep", "3"]) != 0
    assert "parallel.expert_parallel=3" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()
    assert convert("megatron-to-hf", "--megatron", tmp_path / "mg", "--out", tmp_path / "back") == 0
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
