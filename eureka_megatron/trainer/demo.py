"""The CPU demo: a tiny Qwen2.5-VL-architecture model learns to count circles with rule-based GRPO.

Everything is made here, nothing is downloaded: the in-repo word-level tokenizer, a randomly
initialised 0.6M-parameter Qwen2.5-VL written as an HF checkpoint, and the synthetic
`count_circles` data. Stage 0 teaches only the answer format (random answers), then GRPO through
the real Megatron actor, HF engine, weight sync and reward pool raises held-out greedy accuracy.
The recipe (`demo_cpu.yaml`, each lever commented) was tuned on a 2-core machine; `bench demo`
measures it per seed (BENCHMARKS.md). The run is deterministic: the same seed on the same machine
gives a bit-identical metrics.jsonl.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from eureka_megatron.config import RLConfig, load_rl_config
from eureka_megatron.data.chat import jinja_chat_template
from eureka_megatron.data.tiny_tokenizer import tiny_tokenizer, tiny_vocab
from eureka_megatron.models.images import CLIP_MEAN, CLIP_STD, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS

# Package data (also at examples/demo_cpu.yaml in the source tree): an installed wheel has it too.
DEMO_CONFIG = Path(str(resources.files("eureka_megatron.trainer") / "demo_cpu.yaml"))


def tiny_qwen2_5_vl_config():
    """Text: 2 layers, hidden 128, 4 heads / 2 KV heads; vision: depth 2, hidden 64."""
    from transformers import Qwen2_5_VLConfig

    v = tiny_vocab()
    eos, pad = v["<|im_end|>"], v["<|endoftext|>"]
    text = dict(vocab_size=len(v), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                tie_word_embeddings=False, initializer_range=0.02, eos_token_id=eos, bos_token_id=None,
                pad_token_id=pad, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [4, 6, 6]})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                  window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=0.02)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
                            vision_start_token_id=v["<|vision_start|>"],
                            vision_end_token_id=v["<|vision_end|>"], eos_token_id=eos,
                            pad_token_id=pad, tie_word_embeddings=False)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny Qwen2.5-VL as a complete HF checkpoint directory: weights, the in-repo
    tokenizer with a chat template that renders the demo's prompts, and the image processor's
    config, so `AutoProcessor` / `pipeline` / a server load it like any released model (the
    stage-0 and final exports copy these files)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from eureka_megatron.models.qwen2_5_vl import QWEN_CHAT  # torch

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    config = tiny_qwen2_5_vl_config()
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.save_pretrained(tmp)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = jinja_chat_template(QWEN_CHAT)
    tokenizer.save_pretrained(tmp)
    write_image_processor_config(tmp, config.vision_config)
    tmp.rename(out)
    return out


def write_image_processor_config(out_dir: Path, vision) -> None:
    """transformers' Qwen2-VL image processor config with the pixel range the demo's prompts are
    built with (`data.min_pixels` / `max_pixels` defaults) and the tower's patch geometry."""
    config = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
              "do_convert_rgb": True, "do_resize": True, "resample": 3,  # PIL bicubic
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
              "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
              "patch_size": vision.patch_size, "temporal_patch_size": vision.temporal_patch_size,
              "merge_size": vision.spatial_merge_size}
    (out_dir / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def demo_config(out_dir: str | Path, overrides: list[str] | None = None) -> RLConfig:
    out = Path(out_dir)
    base = [f"output.dir={out}", f"model.hf={out / 'tiny_init'}"]
    return load_rl_config(DEMO_CONFIG, base + list(overrides or []))
