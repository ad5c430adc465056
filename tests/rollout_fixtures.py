"""Tiny real transformers models, a tiny tokenizer and prompts for rollout tests.

Every family our converters know (Qwen2, Qwen3, Qwen3-MoE, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE,
transformers-native InternVL) at a size that generates in milliseconds on CPU. Weights are random but deliberately not flat (large init range,
perturbed norms): near-uniform logits would make greedy comparisons hinge on 1e-7 ties.
"""
from __future__ import annotations

import torch

from eureka_megatron.rollout.engine import Prompt

VOCAB = 256
EOS, VSTART, VIDEO, IMAGE = 252, 253, 254, 255  # special tokens at the top of the vocab
PAD = 0
TILE = 56  # InternVL tile side in pixels: (56 / 14)^2 patches -> 4 tokens after pixel shuffle
QWEN_PATCH_DIM = 3 * 2 * 14 * 14  # channels * temporal patch * patch^2
QWEN3_VL_PATCH_DIM = 3 * 2 * 16 * 16  # Qwen3-VL: 16-px patches


def tiny_tokenizer():
    """A fast tokenizer whose token i decodes to a fixed two-letter string (so stop strings can
    span token boundaries); the special tokens are skipped when decoding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {letters[i // 26 % 26] + letters[i % 26]: i for i in range(EOS)}
    specials = {"<eos>": EOS, "<vision_start>": VSTART, "<video>": VIDEO, "<image>": IMAGE}
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="aa"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="aa")
    fast.add_special_tokens({"additional_special_tokens": ["<vision_start>", "<video>", "<image>"]})
    return fast


def _roughen(model, seed: int):
    """Perturb constant-initialised 1-D tensors so every weight matters to the logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda_" in name:
                p.uniform_(0.5, 1.5, generator=gen)
            elif name.endswith("mlp.gate.weight"):  # MoE routers (transformers inits them to 0)
                p.normal_(0.0, 0.5, generator=gen)
            elif p.ndim == 1 or "cls_token" in name or "position_embeddings" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def qwen2_config(tie: bool = False):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1,
                       eos_token_id=EOS, pad_token_id=PAD,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def qwen3_config(tie: bool = False):
    """Qwen3: q/k norms, no qkv bias, head_dim (24) not hidden / heads."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                       max_position_embeddings=512, tie_word_embeddings=tie, initializer_range=0.1,
                       bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def qwen3_moe_config(tie: bool = False):
    """Qwen3-MoE: 8 experts of width 32, top 2, renormalised."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                          moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                          norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
                          tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1,
                          eos_token_id=EOS, pad_token_id=PAD,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def qwen2_5_vl_config(tie: bool = False):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, initializer_range=0.1, bos_token_id=1,
                         eos_token_id=EOS, pad_token_id=PAD,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, window_size=56, fullatt_block_indexes=[1],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           initializer_range=0.2),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
        eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=tie)


def _qwen3_vl_parts(moe: bool):
    """Qwen3-VL's tiny text and vision configs: a 3-block tower with DeepStack from blocks 0 and
    2 (16-px patches, a 4x4 position table), a 2-layer Qwen3 LLM (head_dim 24, interleaved
    mrope [6, 3, 3]); with `moe`, 8 experts of width 32, top 2."""
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                max_position_embeddings=512, initializer_range=0.1, bos_token_id=1,
                eos_token_id=EOS, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [6, 3, 3], "mrope_interleaved": True})
    if moe:
        text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 2],
                  initializer_range=0.2)
    return dict(text_config=text, vision_config=vision, image_token_id=IMAGE,
                video_token_id=VIDEO, vision_start_token_id=VSTART, eos_token_id=EOS,
                pad_token_id=PAD)


def qwen3_vl_config(tie: bool = False):
    """Qwen3-VL; transformers ties the embeddings by the top-level flag."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(**_qwen3_vl_parts(moe=False), tie_word_embeddings=tie)


def qwen3_vl_moe_config(tie: bool = False):
    """Qwen3-VL-MoE: Qwen3-VL's tiny tower on a 2-layer MoE LLM (8 experts, top 2)."""
    from transformers import Qwen3VLMoeConfig

    return Qwen3VLMoeConfig(**_qwen3_vl_parts(moe=True), tie_word_embeddings=tie)


def internvl_config():
    from transformers import InternVLConfig

    text = dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.1,
                bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  norm_type="layer_norm", attention_bias=True, image_size=TILE, patch_size=14,
                  initializer_range=0.1)
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE,
                          downsample_ratio=0.5, tie_word_embeddings=False, eos_token_id=EOS,
                          pad_token_id=PAD)


CONFIGS = {"qwen2": qwen2_config, "qwen3": qwen3_config, "qwen3_moe": qwen3_moe_config,
           "qwen2_5_vl": qwen2_5_vl_config, "qwen3_vl": qwen3_vl_config,
           "qwen3_vl_moe": qwen3_vl_moe_config, "internvl": internvl_config}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
           "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration",
           "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
           "internvl": "InternVLForConditionalGeneration"}


def tiny_model(family: str, seed: int = 0, **kw):
    """A random fp32 model of `family` (a key of CONFIGS)."""
    import transformers

    cfg = CONFIGS[family](**kw)
    cls = getattr(transformers, CLASSES[family])
    torch.manual_seed(seed)
    return _roughen(cls(cfg), seed)


def _text(gen, n: int) -> list[int]:
    return torch.randint(1, EOS, (n,), generator=gen).tolist()


def text_prompts(lengths=(3, 9, 5), seed: int = 0) -> list[Prompt]:
    gen = torch.Generator().manual_seed(seed)
    return [Prompt(input_ids=_text(gen, n)) for n in lengths]


def qwen2_5_vl_prompt(gen, before: int, grids: list[tuple[int, int, int]], after: int,
                      patch_dim: int = QWEN_PATCH_DIM) -> Prompt:
    """Text, then each image as <vision_start> + (h/2 * w/2) image tokens, then text."""
    ids = _text(gen, before)
    for t, h, w in grids:
        ids += [VSTART] + [IMAGE] * (t * h * w // 4) + _text(gen, 2)
    ids += _text(gen, after)
    mm = {}
    if grids:
        patches = sum(t * h * w for t, h, w in grids)
        mm = {"pixel_values": torch.randn(patches, patch_dim, generator=gen),
              "image_grid_thw": torch.tensor(grids)}
    return Prompt(input_ids=ids, mm_inputs=mm)


def qwen2_5_vl_prompts(seed: int = 0, patch_dim: int = QWEN_PATCH_DIM) -> list[Prompt]:
    """Different lengths and image counts: one image, none, two of different sizes."""
    gen = torch.Generator().manual_seed(seed)
    return [qwen2_5_vl_prompt(gen, 3, [(1, 4, 4)], 4, patch_dim),
            qwen2_5_vl_prompt(gen, 6, [], 0, patch_dim),
            qwen2_5_vl_prompt(gen, 2, [(1, 8, 6), (1, 4, 8)], 3, patch_dim)]


def qwen3_vl_prompts(seed: int = 0) -> list[Prompt]:
    """Qwen2.5-VL's prompts (the same markup and patch grids) with Qwen3-VL's 16-px patches
    (3 x 2 x 16 x 16 values a patch): a (1, h, w) grid is h x w patches, h*w/4 LLM tokens."""
    return qwen2_5_vl_prompts(seed, QWEN3_VL_PATCH_DIM)


def internvl_prompt(gen, before: int, tiles: list[int], after: int) -> Prompt:
    """Text, then each image as tiles * 4 image tokens, then text."""
    ids = _text(gen, before)
    for n in tiles:
        ids += [IMAGE] * (4 * n) + _text(gen, 1)
    ids += _text(gen, after)
    mm = {"pixel_values": torch.randn(sum(tiles), 3, TILE, TILE, generator=gen)} if tiles else {}
    return Prompt(input_ids=ids, mm_inputs=mm)


def internvl_prompts(seed: int = 0) -> list[Prompt]:
    gen = torch.Generator().manual_seed(seed)
    return [internvl_prompt(gen, 2, [2], 5), internvl_prompt(gen, 7, [], 0),
            internvl_prompt(gen, 1, [1, 3], 2)]


PROMPTS = {"qwen2": text_prompts, "qwen3": text_prompts, "qwen3_moe": text_prompts,
           "qwen2_5_vl": qwen2_5_vl_prompts, "qwen3_vl": qwen3_vl_prompts,
           "qwen3_vl_moe": qwen3_vl_prompts, "internvl": internvl_prompts}


def full_forward_logits(model, ids: list[int], mm_inputs: dict) -> torch.Tensor:
    """fp32 logits [S, V] of one unpadded sequence through transformers' own forward (no cache,
    positions as transformers derives them) -- the independent reference for engine tests."""
    x = torch.tensor([ids])
    kw = dict(mm_inputs)
    if "image_grid_thw" in kw:  # transformers 5 derives mrope positions only from these types
        kw["mm_token_type_ids"] = (x == IMAGE).int()
    with torch.no_grad():
        return model(input_ids=x, use_cache=False, **kw).logits[0].float()
