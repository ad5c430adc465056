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

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from eureka_megatron.errors import UserError

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "QWEN_MIN_PIXELS",
           "QWEN_MAX_PIXELS", "ImageOptions", "normalized_chw", "preprocessor_config",
           "qwen_pixel_range"]

PREPROCESSOR_CONFIG = "preprocessor_config.json"


class PreprocessorConfigError(UserError, ValueError):
    """A preprocessor_config.json that cannot be read; the message names the file."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 14 * 14 * 4 * 1280


def preprocessor_config(directory: str | Path) -> dict:
    """A HF checkpoint's preprocessor_config.json ({} where there is none): the image processor
    settings the engines preprocess with, so the trainer must too."""
    path = Path(directory) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PreprocessorConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise PreprocessorConfigError(f"{path} holds {type(config).__name__}, not a JSON object")
    return config


def qwen_pixel_range(preprocessor: dict) -> dict:
    """The pixel range a Qwen-VL preprocessor config sets, read as transformers'
    Qwen2VLImageProcessor reads it: `size` {shortest_edge, longest_edge}, overridden by the older
    top-level min_pixels / max_pixels. Only what the file sets (Qwen2.5-VL's hub file: 3136 ..
    12845056, not the processor class's default 1003520)."""
    size = preprocessor.get("size") if isinstance(preprocessor.get("size"), dict) else {}
    out = {"min_pixels": preprocessor.get("min_pixels", size.get("shortest_edge")),
           "max_pixels": preprocessor.get("max_pixels", size.get("longest_edge"))}
    return {k: int(v) for k, v in out.items() if v is not None}


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
    # InternVL: on an aspect-ratio tie take the grid with more tiles whatever the image's size
    # (SGLang's processor); False: InternVL's own rule, only while the image is big enough
    ties_to_most_tiles: bool = False

    def validate(self) -> "ImageOptions":
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                             f"{self.max_pixels}")
        return self
