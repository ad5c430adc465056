"""Qwen3-VL's image preprocessing, numerically identical to transformers' PIL-backend
`Qwen2VLImageProcessorPil` as Qwen3-VL's checkpoints configure it (see `models/images.py` for
why and for the shared arithmetic).

The same steps as Qwen2.5-VL's (resize to multiples of patch*merge within a pixel range, patches
in merge-window order, each repeated temporal_patch_size times), with Qwen3-VL's numbers: 16x16
patches (factor 32) and mean = std = 0.5 per channel. The checkpoints' own pixel range
(preprocessor_config.json: shortest_edge 65536, longest_edge 16777216, which SGLang's processor
uses; the hub's numbers where a checkpoint has no such file) is what `image_options_from_hf`
gives a run; data.min_pixels / max_pixels, where set,
override it (`data/sources.image_options`).
"""
from __future__ import annotations

import torch
from PIL import Image

from eureka_megatron.models.images import ImageOptions, qwen_pixel_range
from eureka_megatron.models.qwen2_5_vl.images import qwen2_5_vl_image_tokens, qwen2_5_vl_pixels

QWEN3_VL_MEAN = (0.5, 0.5, 0.5)
QWEN3_VL_STD = (0.5, 0.5, 0.5)
QWEN3_VL_MIN_PIXELS = 65536
QWEN3_VL_MAX_PIXELS = 16777216


def qwen3_vl_pixels(images: list[Image.Image], *, min_pixels: int = QWEN3_VL_MIN_PIXELS,
                    max_pixels: int = QWEN3_VL_MAX_PIXELS, patch_size: int = 16,
                    temporal_patch_size: int = 2, merge_size: int = 2
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values float32 [sum of patches, 3*T*P*P], image_grid_thw long [n_images, 3]):
    Qwen2.5-VL's resize and patch order with Qwen3-VL's geometry and normalisation."""
    return qwen2_5_vl_pixels(images, min_pixels=min_pixels, max_pixels=max_pixels,
                             patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                             merge_size=merge_size, mean=QWEN3_VL_MEAN, std=QWEN3_VL_STD)


def image_inputs(images: list[Image.Image], o: ImageOptions) -> tuple[dict, list[int]]:
    """The family's hook: (pixel_values + image_grid_thw, LLM tokens per image). The patch
    geometry comes from the checkpoint (`image_options_from_hf`)."""
    pixel_values, grid = qwen3_vl_pixels(images, min_pixels=o.min_pixels, max_pixels=o.max_pixels,
                                         patch_size=o.patch_size, merge_size=o.merge_size,
                                         temporal_patch_size=o.temporal_patch_size)
    return ({"pixel_values": pixel_values, "image_grid_thw": grid},
            qwen2_5_vl_image_tokens(grid, o.merge_size))


def image_options_from_hf(hf_config: dict, preprocessor: dict) -> dict:
    """The tower's patch geometry from config.json (Qwen3-VL: 16x16 patches, 2x2 merge) and the
    pixel range of the checkpoint's preprocessor_config.json (the hub's where it sets none; a
    run's data.min_pixels / max_pixels override it)."""
    v = hf_config.get("vision_config") or {}
    return {"patch_size": _int(v.get("patch_size", 16)),
            "merge_size": _int(v.get("spatial_merge_size", 2)),
            "temporal_patch_size": _int(v.get("temporal_patch_size", 2)),
            "min_pixels": QWEN3_VL_MIN_PIXELS, "max_pixels": QWEN3_VL_MAX_PIXELS,
            **qwen_pixel_range(preprocessor)}


def _int(x) -> int:
    """HF allows a size as one int or a per-axis list (equal axes here)."""
    return int(x[0] if isinstance(x, (list, tuple)) else x)
