"""The model families, keyed by HF `model_type`: one line per family. Each family's package
(`models/<name>/`) holds everything about it (see `models/family.py`)."""
from __future__ import annotations

from eureka_megatron.errors import ConfigError
from eureka_megatron.models import (internvl, qwen2, qwen2_5_vl, qwen3, qwen3_moe, qwen3_vl,
                                    qwen3_vl_moe)
from eureka_megatron.models.family import Family

FAMILIES: list[Family] = [
    qwen2.FAMILY,
    qwen3.FAMILY,
    qwen3_moe.FAMILY,
    qwen2_5_vl.FAMILY,
    qwen3_vl.FAMILY,
    qwen3_vl_moe.FAMILY,
    internvl.FAMILY,
]


def supported_model_types() -> list[str]:
    return [t for f in FAMILIES for t in f.model_types]


def family_for(hf_config: dict, where: str = "config.json") -> Family:
    """The family of a checkpoint's config.json; a ConfigError naming the supported types."""
    model_type = hf_config.get("model_type")
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ConfigError(f"{where}: model_type {model_type!r} is not supported; supported: "
                      f"{', '.join(supported_model_types())}")


def family_named(name: str) -> Family:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise ConfigError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")
