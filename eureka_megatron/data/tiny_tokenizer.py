"""A word-level tokenizer built in the repo, for the CPU demo and tests: no download, ~100 tokens.

It knows the Qwen2.5-VL chat and vision special tokens, the <think>/<answer> tags, digits,
the letters A-J and the words of the synthetic questions; anything else is <unk>. Words are
split on whitespace with punctuation and tags isolated, and decoded joined by spaces, so a
response decodes to e.g. "<think> count </think> <answer> 3 </answer>" -- which the format and
accuracy rewards read like any model's output.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>", "<unk>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
WORDS = ("how many circles are in the image what digit is shown sum of two digits bars "
         "labelled and from left to right which bar tallest answer with or count think then "
         "system user assistant you a helpful first reason inside tags give final How What The Which "
         "Answer Think").split()
PUNCT = list("?.,:;!()=+-*/$\\{}")


def tiny_vocab() -> dict[str, int]:
    tokens = SPECIAL + TAGS + list(string.digits) + list("ABCDEFGHIJ") + PUNCT
    tokens += [w for w in dict.fromkeys(WORDS) if w not in tokens]
    return {t: i for i, t in enumerate(tokens)}


def tiny_tokenizer():
    """A transformers fast tokenizer (save_pretrained-able) over `tiny_vocab()`; eos <|im_end|>."""
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"</?(?:think|answer)>|[A-Za-z]+|\d|[^\sA-Za-z\d]"),
                             behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[1:6] + ["<|video_pad|>"]})
    return fast
