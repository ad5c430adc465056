"""The RL loop end to end with a MoE VLM and routing replay: a tiny Qwen3-VL-MoE checkpoint
(DeepStack tower, 8 experts top-2, the demo's tokenizer and chat template) trained by `run_rl`
with its experts over EP2, the HF engine reporting its routing and the actor replaying it.

Its routers are near-tied (one shared row + 1e-6 noise), so routing is decided by rounding and
the engine and the trainer pick different experts for some tokens: without replay the trainer's
log-probs of the engine's samples differ by O(1) (tests/dist/test_routing_replay.py measures
0.76 on the text model); here, with replay through collect -> sequences -> micro-batches ->
Actor.call, the loop's own rollout-agreement metric stays at fp32 rounding, and the first step's
ratio is exactly 1 and KL to the reference exactly 0 (the reference replays the same routing).
"""
from pathlib import Path

import torch

from eureka_megatron.data.chat import jinja_chat_template
from eureka_megatron.data.tiny_tokenizer import tiny_tokenizer, tiny_vocab
from eureka_megatron.models.qwen2_5_vl import QWEN_CHAT
from eureka_megatron.runtime.launcher import launch
from eureka_megatron.trainer.demo import demo_config
from eureka_megatron.trainer.loop import run_rl


def write_tiny_qwen3_vl_moe(out: Path) -> Path:
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    v = tiny_vocab()
    eos, pad = v["<|im_end|>"], v["<|endoftext|>"]
    config = Qwen3VLMoeConfig(
        text_config=dict(vocab_size=len(v), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=32, max_position_embeddings=1024,
                         eos_token_id=eos, pad_token_id=pad, initializer_range=0.02,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0], initializer_range=0.02),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"],
        eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):  # near-tied routers: routing decided by rounding
                p.copy_(torch.randn(1, p.shape[1], generator=gen) * 0.5
                        + 1e-6 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = jinja_chat_template(QWEN_CHAT)
    tokenizer.save_pretrained(out)
    return out


def test_moe_vlm_rl_step_with_routing_replay_at_ep2(tmp_path):
    hf = write_tiny_qwen3_vl_moe(tmp_path / "hf")
    cfg = demo_config(tmp_path / "run", [
        f"model.hf={hf}", "warmup.steps=0", "train.steps=1", "train.rollout_batch_size=4",
        "rollout.n_samples=4", "rollout.max_new_tokens=6", "algo.online_filter=false",
        "eval.interval=0", "data.synthetic_size=32", "output.progress=false",
        "output.hf_export=false", "rewards.num_workers=1", "train.mini_batches=2",
        "algo.kl_coef=0.1", "algo.kl_in=loss", "data.min_pixels=4096", "data.max_pixels=16384",
        "parallel.nproc=2", "parallel.expert_parallel=2", "rollout.routing_replay=true"])
    history = launch(run_rl, 2, cfg, timeout=600)[0]
    step = history[-1]
    assert step["first/ratio_min"] == 1.0 and step["first/ratio_max"] == 1.0
    assert step["first/kl"] == 0.0
    assert step["rollout/logprob_abs_diff_max"] < 1e-4, step["rollout/logprob_abs_diff_max"]
    assert step["weight_version"] == 1.0 and step["train/tokens"] > 0
