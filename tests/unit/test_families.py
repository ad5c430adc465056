"""The family registry: each `Family` entry agrees with transformers' own model of that family
(its class, its config, the naming layout of its state_dict, the mapping covering every tensor)
and with its own chat and image hooks; lookups fail naming what is supported."""
from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image

from eureka_megatron.config import ConfigError
from eureka_megatron.models.family import TensorNames
from eureka_megatron.models.images import ImageOptions
from eureka_megatron.models.registry import FAMILIES, family_for, family_named
from tests import rollout_fixtures as F

NAMES = [f.name for f in FAMILIES]


def test_model_types_and_names_are_unique():
    types = [t for f in FAMILIES for t in f.model_types]
    assert len(types) == len(set(types)) and len(NAMES) == len(set(NAMES))
    for fam in FAMILIES:
        assert family_for({"model_type": fam.model_types[0]}) is fam
        assert family_named(fam.name) is fam
        assert fam.hf_model_type in fam.model_types


@pytest.mark.parametrize("name", NAMES)
def test_family_matches_transformers_model(name):
    """The transformers class the HF engine builds is the family's; its state_dict is in the
    family's `hf_layout`, and that layout's mapping covers every tensor of it, both ways."""
    fam = family_named(name)
    model = F.tiny_model(name)
    assert type(model).__name__ == fam.hf_class and getattr(transformers, fam.hf_class)
    assert model.config.model_type == fam.hf_model_type
    sd = model.state_dict()
    names = set(sd)
    assert fam.detect_layout(TensorNames.of(sd)) == fam.hf_layout
    cfg = fam.config_from_hf(model.config.to_dict(), None)
    mapping = fam.mapping(cfg, fam.hf_layout)
    # transformers ties by the top-level flag (Qwen3-VL's text config may say otherwise)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    assert mapping.hf_names() == names - tied


@pytest.mark.parametrize("name", [f.name for f in FAMILIES if f.is_vlm])
def test_vlm_hooks_agree(name):
    """A VLM's image hook gives as many LLM tokens as transformers' tower emits for the same
    pixels, and its chat markup and SGLang placeholder are defined."""
    fam = family_named(name)
    assert fam.chat is not None and fam.sglang_image_placeholder
    model = F.tiny_model(name)
    # the checkpoint's own options (Qwen3-VL: 16-px patches) over the run's tiling, a small
    # pixel range set by the run over the checkpoint's (as data/sources.image_options merges)
    options = ImageOptions(**dict(image_size=F.TILE, max_tiles=4)
                           | fam.image_options_from_hf(model.config.to_dict(), {})
                           | dict(min_pixels=56 * 56, max_pixels=112 * 56))
    fam.check_images(options)
    mm, counts = fam.image_inputs([Image.new("RGB", (112, 56), (200, 30, 30))], options)
    with torch.no_grad():
        feats = model.model.get_image_features(**mm)
    assert sum(counts) == image_feature_rows(feats, model.config.get_text_config().hidden_size)


def image_feature_rows(feats, hidden: int) -> int:
    """LLM-token rows of what `get_image_features` returned (a tensor, per-image tensors, or an
    output object, by transformers version and family)."""
    feats = getattr(feats, "pooler_output", feats)
    parts = feats if isinstance(feats, (list, tuple)) else [feats]
    assert all(p.shape[-1] == hidden for p in parts)
    return sum(p.reshape(-1, hidden).shape[0] for p in parts)


def test_unknown_families_name_the_supported_ones():
    with pytest.raises(ConfigError, match="model_type 'llava' is not supported; supported: qwen2"):
        family_for({"model_type": "llava"})
    with pytest.raises(ConfigError, match="unknown model family 'llava'; known: qwen2"):
        family_named("llava")
