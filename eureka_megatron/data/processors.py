"""Model-family image preprocessing: RGB PIL images -> the pixel tensors the vision towers take.

Written without torchvision so it runs on every host, and kept numerically identical to
transformers' PIL-backend processors (`Qwen2VLImageProcessorPil`, `GotOcr2ImageProcessorPil`
with crop_to_patches, which is what InternVL's HF processor uses), because the trainer's
log-probs must match the rollout engine's, and engines preprocess with those processors.
The arithmetic follows them step for step: PIL bicubic resize on uint8, x * (1/255) in float64
cast to float32, then (x - mean) / std in float32.

Qwen2.5-VL: the image is resized so both sides are multiples of patch*merge (28) with the pixel
count inside [min_pixels, max_pixels], then cut into 14x14 patches ordered merge-window by
merge-window (each 2x2 window of patches is contiguous, the order the patch merger expects);
each patch is repeated temporal_patch_size times, as a still frame of a 2-frame video.
One image gives grid (1, h/14, w/14) and grid.prod() // merge**2 LLM tokens.

InternVL: dynamic tiling. The tile grid (cols x rows, min_tiles <= cols*rows <= max_tiles) whose
aspect ratio is closest to the image's is chosen; on an exact tie the later (more tiles) grid
wins only while the image area exceeds half the tiles' area (InternVL's find_closest_aspect_ratio).
The image is resized to (cols*S, rows*S) and cut row-major into S x S tiles; with more than one
tile a thumbnail (the whole image at S x S) is appended. Candidate grids are ordered by tile
count, then by columns (InternVL's reference iterates a Python set there, so exact ties between
two grids with the same tile count -- which are never the closest ratio in practice -- follow
this order rather than set order).
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD",
    "smart_resize", "qwen2_5_vl_pixels", "qwen2_5_vl_image_tokens",
    "tile_grid", "internvl_tiles", "internvl_pixels", "internvl_image_tokens",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QWEN_MIN_PIXELS = 56 * 56
QWEN_MAX_PIXELS = 14 * 14 * 4 * 1280


def _normalized_chw(im: Image.Image, mean, std) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, rescaled then normalised exactly as transformers does."""
    x = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --- Qwen2.5-VL ----------------------------------------------------------------------------


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
                      temporal_patch_size: int = 2, merge_size: int = 2
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values float32 [sum of patches, 3*T*P*P], image_grid_thw long [n_images, 3])."""
    if not images:
        raise ValueError("qwen2_5_vl_pixels needs at least one image")
    p, m, t = patch_size, merge_size, temporal_patch_size
    chunks, grids = [], []
    for im in images:
        h, w = smart_resize(im.height, im.width, factor=p * m, min_pixels=min_pixels,
                            max_pixels=max_pixels)
        x = _normalized_chw(im.resize((w, h), Image.Resampling.BICUBIC), CLIP_MEAN, CLIP_STD)
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


# --- InternVL ------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))  # stable: by count, then columns


def tile_grid(width: int, height: int, *, image_size: int = 448, min_tiles: int = 1,
              max_tiles: int = 12) -> tuple[int, int]:
    """(columns, rows) of InternVL's dynamic tiling for a width x height image."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for c, r in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * c * r:
            best = (c, r)  # same ratio, more tiles: worth it while the image is big enough
    return best


def internvl_tiles(image: Image.Image, *, image_size: int = 448, min_tiles: int = 1,
                   max_tiles: int = 12, use_thumbnail: bool = True) -> list[Image.Image]:
    """S x S tiles, row-major, plus a whole-image thumbnail when there is more than one tile."""
    cols, rows = tile_grid(image.width, image.height, image_size=image_size,
                           min_tiles=min_tiles, max_tiles=max_tiles)
    s = image_size
    big = image.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
    tiles = [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((s, s), Image.Resampling.BICUBIC))
    return tiles


def internvl_pixels(images: list[Image.Image], *, image_size: int = 448, max_tiles: int = 12,
                    use_thumbnail: bool = True, min_tiles: int = 1
                    ) -> tuple[torch.Tensor, list[int]]:
    """(pixel_values float32 [tiles, 3, S, S] with ImageNet mean/std, tiles per image)."""
    if not images:
        raise ValueError("internvl_pixels needs at least one image")
    arrays, counts = [], []
    for im in images:
        tiles = internvl_tiles(im, image_size=image_size, min_tiles=min_tiles,
                               max_tiles=max_tiles, use_thumbnail=use_thumbnail)
        arrays += [_normalized_chw(t, IMAGENET_MEAN, IMAGENET_STD) for t in tiles]
        counts.append(len(tiles))
    return torch.from_numpy(np.stack(arrays)), counts


def internvl_image_tokens(tiles_per_image: list[int], *, image_size: int = 448,
                          patch_size: int = 14, downsample_ratio: float = 0.5) -> list[int]:
    """LLM tokens per image: tiles x (S/patch)^2 x downsample_ratio^2 (pixel shuffle)."""
    per_tile = (image_size / patch_size) ** 2 * downsample_ratio ** 2
    if per_tile != int(per_tile):
        raise ValueError(f"(image_size/patch_size)^2 * downsample_ratio^2 = {per_tile} "
                         "is not a whole number of tokens")
    return [n * int(per_tile) for n in tiles_per_image]
