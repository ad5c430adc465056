"""`bench convert`: time and peak memory of both converters on synthetic checkpoints with the real
layer shapes of Qwen2.5-VL-7B and InternVL2.5-38B.

The synthetic HF directory is written from the hub config (names and shapes come from our own
mapping run backwards on the model's meta-device skeleton), in 5 GB bf16 shards like the hub's.
Each conversion runs as a separate `eureka-megatron convert` process, so its peak RSS (largest
process, including the meta-device model it spawns) is measured cleanly. Models too large for the
disk are built with fewer layers, and the full-model time is extrapolated by size. The bound is
a plain file copy of the synthetic checkpoint's bytes (a converter reads and writes each once).
`--quick` converts only Qwen2.5-VL-7B with one layer of each kind and a vocabulary of 8192.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from eureka_megatron.bench.report import LEAD, lead
from eureka_megatron.convert.hf_io import ShardedSafetensorsWriter
from eureka_megatron.convert.run import model_skeleton
from eureka_megatron.models.registry import family_for

QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655, "vision_start_token_id": 151652,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
}

# Qwen/Qwen2.5-VL-32B-Instruct: the 7B's keys with models-and-conversion.md section 1's sizes
QWEN2_5_VL_32B = {**QWEN2_5_VL_7B, "hidden_size": 5120, "intermediate_size": 27648,
                  "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                  "vision_config": {**QWEN2_5_VL_7B["vision_config"], "intermediate_size": 3456,
                                    "out_hidden_size": 5120}}

INTERNVL2_5_38B = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
    "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "template": "internvl2_5",
    "force_image_size": 448, "torch_dtype": "bfloat16",
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                   "vocab_size": 151674, "hidden_size": 5120, "intermediate_size": 27648,
                   "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                      "hidden_size": 3200, "intermediate_size": 12800, "num_hidden_layers": 45,
                      "num_attention_heads": 25, "norm_type": "rms_norm", "layer_norm_eps": 1e-6,
                      "qkv_bias": False, "qk_normalization": True, "image_size": 448,
                      "patch_size": 14, "num_channels": 3, "hidden_act": "gelu",
                      "torch_dtype": "bfloat16"},
}

# OpenGVLab/InternVL3_5-38B (internvl_chat layout): InternViT-6B-448px-V2_5 + Qwen3-32B. Its own
# config.json was not found in any stored copy, so this is assembled from parts that were:
#  - top level: the model's authors' SFT recipe, github.com/OpenGVLab/InternVL
#    internvl_chat_gpt_oss/shell/internvl3_5_qwen3/internvl3_5_38b_sft.sh (force_image_size 448,
#    max_dynamic_patch 12, down_sample_ratio 0.5, vision_select_layer -1, dynamic_image_size,
#    use_thumbnail, ps_version 'v2', conv_style -> template "internvl2_5"); min_dynamic_patch 1
#    and eos_token_id 151645 as in huggingface.co/OpenGVLab/InternVL3_5-1B config.json
#  - llm_config: Qwen/Qwen3-32B's config.json (quoted verbatim in a verl doc of Ascend runs,
#    where only num_hidden_layers was edited, 64 -> 16, and said so); InternVL3.5 llm_configs
#    keep the base Qwen3 config's fields (InternVL3_5-1B's: Qwen3-0.6B's vocab 151936, 40960
#    positions, rope_theta 1e6, no rope scaling)
#  - vision_config: InternViT-6B-448px-V2_5, the same tower as InternVL2.5-38B's (above)
# The LLM is Qwen3-32B per the InternVL3.5 model cards / paper (arXiv 2508.18265).
INTERNVL3_5_38B = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
    "downsample_ratio": 0.5, "select_layer": -1, "ps_version": "v2", "template": "internvl2_5",
    "force_image_size": 448, "dynamic_image_size": True, "use_thumbnail": True,
    "min_dynamic_patch": 1, "max_dynamic_patch": 12, "eos_token_id": 151645,
    "llm_config": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
                   "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                   "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                   "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 25600,
                   "max_position_embeddings": 40960, "max_window_layers": 64,
                   "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-6, "rope_scaling": None, "rope_theta": 1000000,
                   "sliding_window": None, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936},
    "vision_config": dict(INTERNVL2_5_38B["vision_config"]),
}

# InternVL chat checkpoints keep the <IMG_CONTEXT> id in the tokenizer config: 151667 with
# InternVL2.5/3's Qwen2.5 tokenizer, 151671 with InternVL3.5's Qwen3 one (151667 is Qwen3's
# <think>; <img> 151669, </img> 151670). 151671: InternLM/xtuner
# xtuner/v1/model/compose/internvl/internvl_config.py (InternVL3.5 image_token_id) and the
# native InternVL3.5 configs' image_token_id.
TOKENIZER_CONFIG = {"added_tokens_decoder": {"151667": {"content": "<IMG_CONTEXT>", "special": True}}}
INTERNVL3_5_TOKENIZER_CONFIG = {
    "added_tokens_decoder": {"151667": {"content": "<think>", "special": True},
                             "151671": {"content": "<IMG_CONTEXT>", "special": True}}}

# Qwen/Qwen3-VL-8B-Instruct config.json, verbatim: a model-inspector report on GitHub quoting the
# raw file of a local download (".../opensource/Qwen3-VL-8B-Instruct/config.json", 原始 config.json)
# with its tensor shapes; a Neuron port of NVIDIA's Alpamayo has the same values (its backbone,
# Cosmos-Reason2-8B, ships Qwen3-VL-8B-Instruct's config byte for byte).
QWEN3_VL_8B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                    "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128,
                    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
                    "intermediate_size": 12288, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32,
                    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                     "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
                      "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}

# Qwen/Qwen3-VL-32B-Instruct config.json: MiniMax-H3 ships it as its text encoder's config
# (".../Qwen3-VL-32B-Instruct/config.json", 1474 bytes); two GitHub ports of MiniMax-H3 quote it
# (one re-serialised: rms_norm_eps 0.000001, no transformers_version), and an architecture note
# "verified against Qwen/Qwen3-VL-32B-Instruct/config.json" gives the same numbers.
QWEN3_VL_32B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                    "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128,
                    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
                    "intermediate_size": 25600, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 64,
                    "num_hidden_layers": 64, "num_key_value_heads": 8, "rms_norm_eps": 1e-6,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                     "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
                      "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304,
                      "out_hidden_size": 5120, "patch_size": 16, "spatial_merge_size": 2,
                      "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}

# Qwen/Qwen3-VL-30B-A3B-Instruct config.json, verbatim: the model-inspector report above quoting
# the raw file (".../opensource/Qwen3-VL-30B-A3B-Instruct/config.json") with its tensor shapes;
# a Rust port's test transcribes the same file "byte-for-byte ... at commit 1fc78ad".
QWEN3_VL_30B_A3B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl_moe",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                    "decoder_sparse_step": 1, "dtype": "bfloat16", "eos_token_id": 151645,
                    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                    "initializer_range": 0.02, "intermediate_size": 6144,
                    "max_position_embeddings": 262144, "mlp_only_layers": [],
                    "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 768,
                    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
                    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
                    "rms_norm_eps": 1e-6,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                     "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
                      "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl_moe", "num_heads": 16,
                      "num_position_embeddings": 2304, "out_hidden_size": 2048, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}

# Qwen/Qwen3-VL-235B-A22B-Instruct: the raw file was not found; its values are. The same
# model-inspector report prints the transformers-5.7 view of a local download of it (which
# renames num_experts -> num_local_experts and folds rope_scaling + rope_theta into
# rope_parameters) with every tensor shape (94 layers, experts [128, 1536, 4096], q_proj
# [8192, 4096], k_proj [512, 4096], merger out 4096, patch_embed [1152, 3, 2, 16, 16]); the text
# fields under their on-disk names are those of ai-dynamo/aiconfigurator
# src/aiconfigurator/model_configs/Qwen--Qwen3-VL-235B-A22B-Thinking_config.json (same
# architecture; its vision_config there is abridged and says patch_size 14, which the tensor
# shapes contradict, so the vision side here is the report's). Key names follow the 30B-A3B file.
QWEN3_VL_235B_A22B = {
    "architectures": ["Qwen3VLMoeForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl_moe",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                    "decoder_sparse_step": 1, "dtype": "bfloat16", "eos_token_id": 151645,
                    "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 12288,
                    "max_position_embeddings": 262144, "mlp_only_layers": [],
                    "model_type": "qwen3_vl_moe_text", "moe_intermediate_size": 1536,
                    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts": 128,
                    "num_experts_per_tok": 8, "num_hidden_layers": 94, "num_key_value_heads": 4,
                    "rms_norm_eps": 1e-6,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                     "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152, "in_channels": 3,
                      "initializer_range": 0.02, "intermediate_size": 4304,
                      "model_type": "qwen3_vl_moe", "num_heads": 16,
                      "num_position_embeddings": 2304, "out_hidden_size": 4096, "patch_size": 16,
                      "spatial_merge_size": 2, "temporal_patch_size": 2},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}


def tokenizer_config_for(hub: dict) -> dict:
    """The tokenizer_config.json (its <IMG_CONTEXT>) of an internvl_chat hub config."""
    arch = (hub.get("llm_config", {}).get("architectures") or [None])[0]
    return INTERNVL3_5_TOKENIZER_CONFIG if arch == "Qwen3ForCausalLM" else TOKENIZER_CONFIG


def write_config_dir(directory: Path, hub: dict) -> Path:
    """An HF directory with only the side files of `hub` (config.json; InternVL's tokenizer
    config): enough for `train --dry-run` and the memory plan."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hub))
    if hub["model_type"] == "internvl_chat":
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_for(hub)))
    return directory


# (name, hub config, LLM layer key path, vision layer key path)
PRESETS = {
    "Qwen2.5-VL-7B": (QWEN2_5_VL_7B, ("num_hidden_layers",), ("vision_config", "depth")),
    "InternVL2.5-38B": (INTERNVL2_5_38B, ("llm_config", "num_hidden_layers"),
                        ("vision_config", "num_hidden_layers")),
    "InternVL3.5-38B": (INTERNVL3_5_38B, ("llm_config", "num_hidden_layers"),
                        ("vision_config", "num_hidden_layers")),
}


def _get(d: dict, path):
    for k in path:
        d = d[k]
    return d


def _set(d: dict, path, value) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


def model_bytes(config: dict, directory: Path) -> int:
    """bf16 size of the model `config` describes (from its meta-device skeleton)."""
    fam = family_for(config)
    skeleton = model_skeleton(fam, fam.config_from_hf(config, directory))
    return sum(2 * torch.Size(shape).numel() for shape, _ in skeleton.tensors.values())


def write_synthetic(config: dict, out: Path, shard_bytes: int = 5 << 30) -> int:
    """A random bf16 HF checkpoint for `config`; returns its size in bytes."""
    fam = family_for(config)
    cfg = fam.config_from_hf(config, out)
    layout = "chat" if config["model_type"] == "internvl_chat" else "disk"
    skeleton = model_skeleton(fam, cfg)
    mapping = fam.mapping(cfg, layout)
    def meta(key):
        shape, axes = skeleton.tensors[key[0]]
        return torch.empty(shape[axes:], device="meta", dtype=torch.bfloat16)

    plan = [(n, tuple(t.shape), t.dtype) for n, t in mapping.iter_hf(meta)]
    writer = ShardedSafetensorsWriter(out, plan, max_bytes=shard_bytes)
    gen = torch.Generator().manual_seed(0)
    for name, shape, dtype in plan:
        writer.add(name, torch.rand(shape, generator=gen, dtype=dtype))
    writer.finish()
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return writer.total_bytes


# Runs argv[2:] (its stdout to stderr) and writes {seconds, code, maxrss_kib} to argv[1]. Linux carries a process's peak
# RSS over fork + exec: a converter started straight from this (large) process would report at
# least this process's peak. Forked from this small interpreter instead, it reports its own.
_RSS_WRAPPER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.dup2(2, 1)  # the converter's report goes to stderr: stdout holds the bench tables
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"seconds": time.perf_counter() - t0, "code": os.waitstatus_to_exitcode(status),
               "maxrss_kib": usage.ru_maxrss}, f)
"""


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS GiB of the largest process) of a command."""
    with tempfile.TemporaryDirectory() as d:
        result = Path(d) / "result.json"
        subprocess.run([sys.executable, "-c", _RSS_WRAPPER, str(result), *cmd], check=True)
        r = json.loads(result.read_text())
    if r["code"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return r["seconds"], r["maxrss_kib"] / 2**20  # the largest of the process and its children


# `--quick`: only Qwen2.5-VL-7B, one LLM and one ViT layer of the real shapes, and the vocabulary
# cut to QUICK_VOCAB rows (the embedding and output layer would be two thirds of the bytes)
QUICK_LAYERS = (1, 1)
QUICK_VOCAB = 8192
VOCAB_PATHS = {"Qwen2.5-VL-7B": ("vocab_size",), "InternVL2.5-38B": ("llm_config", "vocab_size"),
               "InternVL3.5-38B": ("llm_config", "vocab_size")}


def copy_seconds(src: Path, dst: Path) -> float:
    """Seconds to copy the safetensors files of `src` to `dst`: the bound of a converter, which
    reads and writes every byte once (from and to the same page cache and disk)."""
    dst.mkdir()
    t0 = time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
    secs = time.perf_counter() - t0
    shutil.rmtree(dst, ignore_errors=True)
    return secs


def run(quick: bool = False) -> tuple[list[dict], list[str]]:

    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    cli = [sys.executable, "-m", "eureka_megatron.cli", "convert"]
    presets = {k: v for k, v in PRESETS.items() if not quick or k == "Qwen2.5-VL-7B"}
    try:
        for name, (config, llm_path, vision_path) in presets.items():
            config = json.loads(json.dumps(config))
            full = (_get(config, llm_path), _get(config, vision_path))
            src, mg, back = work / "hf", work / "mg", work / "back"
            src.mkdir()
            (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config_for(config)))
            full_bytes = model_bytes(config, src)
            # 38B (77 GB in bf16) does not fit a workstation disk three times: fewer layers.
            layers = QUICK_LAYERS if quick else (full if name == "Qwen2.5-VL-7B" else (8, 6))
            _set(config, llm_path, layers[0])
            _set(config, vision_path, layers[1])
            if quick:
                _set(config, VOCAB_PATHS[name], QUICK_VOCAB)
            if name == "Qwen2.5-VL-7B":  # full attention blocks must exist in the shorter tower
                config["vision_config"]["fullatt_block_indexes"] = [
                    i for i in config["vision_config"]["fullatt_block_indexes"] if i < layers[1]]
            (src / "config.json").write_text(json.dumps(config))
            t0 = time.perf_counter()
            # in a child process: a forked converter would inherit (and report) this one's RSS
            subprocess.run([sys.executable, "-m", "eureka_megatron.bench.convert", str(src)],
                           check=True)
            size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            print(f"[bench convert] {name}: synthetic {size / 2**30:.1f} GiB in "
                  f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            copy_s = copy_seconds(src, work / "copy")
            bound = size / 2**30 / copy_s
            to_mg = _timed(cli + ["hf-to-megatron", "--hf", str(src), "--out", str(mg), "--quiet"])
            to_hf = _timed(cli + ["megatron-to-hf", "--megatron", str(mg), "--out", str(back), "--quiet"])
            scale = full_bytes / size
            vocab = f", vocab {QUICK_VOCAB}" if quick else ""
            for direction, (secs, peak) in (("hf -> megatron", to_mg), ("megatron -> hf", to_hf)):
                rate = size / 2**30 / secs
                rows.append({**lead(f"{name} {direction}",
                                    f"{layers[0]}+{layers[1]} layers{vocab}, {size / 2**30:.2f} GiB",
                                    secs, rate, "GiB/s", 100 * rate / bound,
                                    f"file copy of the same bytes {bound:.3g} GiB/s"),
                             "model": name, "layers (LLM+ViT)": f"{layers[0]}+{layers[1]}",
                             "direction": direction, "size (GiB)": round(size / 2**30, 2),
                             "seconds": round(secs, 1), "GiB/s": round(rate, 3),
                             "peak RSS (GiB)": round(peak, 2),
                             "full model (s, est.)": round(secs * scale, 0)})
            for d in (src, mg, back):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, LEAD + ["peak RSS (GiB)", "full model (s, est.)"]


if __name__ == "__main__":  # python -m eureka_megatron.bench.convert DIR (with DIR/config.json)
    directory = Path(sys.argv[1])
    write_synthetic(json.loads((directory / "config.json").read_text()), directory)
