"""The CPU demo: a tiny Qwen2.5-VL-architecture model learns to count circles with rule-based GRPO.

Everything is made here, nothing is downloaded: the in-repo word-level tokenizer, a randomly
initialised 0.6M-parameter Qwen2.5-VL written as an HF checkpoint, and the synthetic
`count_circles` data. Stage 0 teaches only the answer format (random answers), then GRPO through
the real Megatron actor, HF engine, weight sync and reward pool raises held-out greedy accuracy.
The numbers were chosen on a 2-core machine (see README: results table) -- the CPU feasibility
trial found lr 3e-4 and patch-aligned objects to be what lets a tiny tower learn.
"""
from __future__ import annotations

from pathlib import Path

from eureka_megatron.rl_config import RLConfig, load_rl_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo_cpu.yaml"


def tiny_qwen2_5_vl_config():
    """Text: 2 layers, hidden 128, 4 heads / 2 KV heads; vision: depth 2, hidden 64."""
    from transformers import Qwen2_5_VLConfig

    from eureka_megatron.data.tiny_tokenizer import tiny_vocab

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
    """A random tiny Qwen2.5-VL + the in-repo tokenizer as an HF checkpoint directory."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from eureka_megatron.data.tiny_tokenizer import tiny_tokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    model.save_pretrained(tmp)
    tiny_tokenizer().save_pretrained(tmp)
    tmp.rename(out)
    return out


def demo_config(out_dir: str | Path, overrides: list[str] | None = None) -> RLConfig:
    out = Path(out_dir)
    base = [f"output.dir={out}", f"model.hf={out / 'tiny_init'}"]
    return load_rl_config(DEMO_CONFIG, base + list(overrides or []))
