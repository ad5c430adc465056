"""Image preprocessing shared by the model families: RGB PIL images -> the pixel tensors the vision towers take.

Written without torchvision so it runs on every host, and kept numerically identical to
transformers' PIL-backend processors (`Qwen2VLImageProcessorPil`, `GotOcr2ImageProcessorPil`
with crop_to_patches, which is what InternVL's HF processor uses), because the trainer's
log-probs must match the rollout engine's, and engines preprocess with those processors.
The arithmetic follows them step for step: PIL bicubic resize on uint8, x * (1/255) in float64
cast to float32, then (x - mean) / std in float32.

The families' own steps (resize rules, patching, tiling) live in `models/<family>/images.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "QWEN_MIN_PIXELS",
           "QWEN_MAX_PIXELS", "ImageOptions", "normalized_chw"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 14 * 14 * 4 * 1280


def normalized_chw(im: Image.Image, mean, std) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, rescaled then normalised exactly as transformers does."""
    x = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


@dataclass(frozen=True)
class ImageOptions:
    """The knobs of every family's image preprocessing (each family reads its own)."""
    min_pixels: int = QWEN_MIN_PIXELS      # Qwen2.5-VL: the resized image's pixel range
    max_pixels: int = QWEN_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2                    # Qwen2.5-VL: patches merged per side
    temporal_patch_size: int = 2
    image_size: int = 448                  # InternVL: the tile side
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    downsample_ratio: float = 0.5          # InternVL: the pixel shuffle

    def validate(self) -> "ImageOptions":
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                             f"{self.max_pixels}")
        return self
