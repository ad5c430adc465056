"""Qwen2.5-VL's image preprocessing, numerically identical to transformers' PIL-backend
`Qwen2VLImageProcessorPil` (see `models/images.py` for why and for the shared arithmetic).

Qwen2.5-VL: the image is resized so both sides are multiples of patch*merge (28) with the pixel
count inside [min_pixels, max_pixels], then cut into 14x14 patches ordered merge-window by
merge-window (each 2x2 window of patches is contiguous, the order the patch merger expects);
each patch is repeated temporal_patch_size times, as a still frame of a 2-frame video.
One image gives grid (1, h/14, w/14) and grid.prod() // merge**2 LLM tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from eureka_megatron.models.images import (CLIP_MEAN, CLIP_STD, QWEN_MAX_PIXELS, QWEN_MIN_PIXELS,
                                             ImageOptions, normalized_chw, qwen_pixel_range)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = QWEN_MIN_PIXELS,
                 max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, close to the input's aspect ratio, with
    min_pixels <= h*w <= max_pixels (rounded to the nearest multiple first; scaled down with
    floor / up with ceil when that leaves the pixel range)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def qwen2_5_vl_pixels(images: list[Image.Image], *, min_pixels: int = QWEN_MIN_PIXELS,
                      max_pixels: int = QWEN_MAX_PIXELS, patch_size: int = 14,
                      temporal_patch_size: int = 2, merge_size: int = 2,
                      mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values float32 [sum of patches, 3*T*P*P], image_grid_thw long [n_images, 3]);
    Qwen3-VL: the same with 16-px patches and mean = std = 0.5."""
    if not images:
        raise ValueError("qwen2_5_vl_pixels needs at least one image")
    p, m, t = patch_size, merge_size, temporal_patch_size
    chunks, grids = [], []
    for im in images:
        h, w = smart_resize(im.height, im.width, factor=p * m, min_pixels=min_pixels,
                            max_pixels=max_pixels)
        x = normalized_chw(im.resize((w, h), Image.Resampling.BICUBIC), mean, std)
        gh, gw = h // p, w // p
        # C, (gh/m, m, p), (gw/m, m, p) -> (gh/m, gw/m, m, m, C, p, p): merge windows contiguous
        x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.repeat(x[:, :, :, :, :, None], t, axis=5)  # a still image as t identical frames
        chunks.append(x.reshape(gh * gw, 3 * t * p * p))
        grids.append((1, gh, gw))
    return (torch.from_numpy(np.concatenate(chunks)),
            torch.tensor(grids, dtype=torch.long))


def qwen2_5_vl_image_tokens(image_grid_thw: torch.Tensor, merge_size: int = 2) -> list[int]:
    """LLM tokens per image: the patch grid after merge_size x merge_size merging."""
    return [int(g) // merge_size ** 2 for g in image_grid_thw.prod(dim=-1).tolist()]


def image_inputs(images: list[Image.Image], o: ImageOptions) -> tuple[dict, list[int]]:
    """The family's hook: (pixel_values + image_grid_thw, LLM tokens per image)."""
    pixel_values, grid = qwen2_5_vl_pixels(images, min_pixels=o.min_pixels, max_pixels=o.max_pixels,
                                           patch_size=o.patch_size, merge_size=o.merge_size,
                                           temporal_patch_size=o.temporal_patch_size)
    return ({"pixel_values": pixel_values, "image_grid_thw": grid},
            qwen2_5_vl_image_tokens(grid, o.merge_size))


def image_options_from_hf(hf_config: dict, preprocessor: dict) -> dict:
    """The pixel range of the checkpoint's preprocessor_config.json, which the engines resize
    with (Qwen2.5-VL's hub file: 3136 .. 12845056); ImageOptions' defaults (the processor
    class's, 3136 .. 1003520) only where it sets none."""
    return qwen_pixel_range(preprocessor)
