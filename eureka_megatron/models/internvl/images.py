"""InternVL's image preprocessing, numerically identical to transformers' PIL-backend
`GotOcr2ImageProcessorPil` with crop_to_patches (see `models/images.py`).

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

from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.images import IMAGENET_MEAN, IMAGENET_STD, ImageOptions, normalized_chw

# What SGLang 0.5.23's InternVL processor does to every image: tiles of 448 px plus a thumbnail,
# an aspect-ratio tie going to the grid with more tiles (InternVL's own rule: only for images
# larger than half those tiles), at most `image_max_dynamic_patch` tiles -- a field it reads
# from single requests only (a batched request loses it when GenerateReqInput splits the batch,
# so our client sends such prompts as single requests) and ignores for InternLM2 LLMs, which it
# always tiles up to 12.
SGLANG_TILING = {"max_tiles": 12, "use_thumbnail": True, "image_size": 448}


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))  # stable: by count, then columns


def tile_grid(width: int, height: int, *, image_size: int = 448, min_tiles: int = 1,
              max_tiles: int = 12, ties_to_most_tiles: bool = False) -> tuple[int, int]:
    """(columns, rows) of InternVL's dynamic tiling for a width x height image; with
    `ties_to_most_tiles`, SGLang's variant (a tie always goes to the grid with more tiles)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for c, r in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and (ties_to_most_tiles
                                    or width * height > 0.5 * image_size * image_size * c * r):
            best = (c, r)  # same ratio, more tiles: worth it while the image is big enough
    return best


def internvl_tiles(image: Image.Image, *, image_size: int = 448, min_tiles: int = 1,
                   max_tiles: int = 12, use_thumbnail: bool = True,
                   ties_to_most_tiles: bool = False) -> list[Image.Image]:
    """S x S tiles, row-major, plus a whole-image thumbnail when there is more than one tile."""
    cols, rows = tile_grid(image.width, image.height, image_size=image_size,
                           min_tiles=min_tiles, max_tiles=max_tiles,
                           ties_to_most_tiles=ties_to_most_tiles)
    s = image_size
    big = image.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
    tiles = [big.crop((c * s, r * s, (c + 1) * s, (r + 1) * s))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((s, s), Image.Resampling.BICUBIC))
    return tiles


def internvl_pixels(images: list[Image.Image], *, image_size: int = 448, max_tiles: int = 12,
                    use_thumbnail: bool = True, min_tiles: int = 1,
                    ties_to_most_tiles: bool = False) -> tuple[torch.Tensor, list[int]]:
    """(pixel_values float32 [tiles, 3, S, S] with ImageNet mean/std, tiles per image)."""
    if not images:
        raise ValueError("internvl_pixels needs at least one image")
    arrays, counts = [], []
    for im in images:
        tiles = internvl_tiles(im, image_size=image_size, min_tiles=min_tiles,
                               max_tiles=max_tiles, use_thumbnail=use_thumbnail,
                               ties_to_most_tiles=ties_to_most_tiles)
        arrays += [normalized_chw(t, IMAGENET_MEAN, IMAGENET_STD) for t in tiles]
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


def image_inputs(images: list[Image.Image], o: ImageOptions) -> tuple[dict, list[int]]:
    """The family's hook: (pixel_values, LLM tokens per image)."""
    pixel_values, tiles = internvl_pixels(images, image_size=o.image_size, min_tiles=o.min_tiles,
                                          max_tiles=o.max_tiles, use_thumbnail=o.use_thumbnail,
                                          ties_to_most_tiles=o.ties_to_most_tiles)
    return ({"pixel_values": pixel_values},
            internvl_image_tokens(tiles, image_size=o.image_size, patch_size=o.patch_size,
                                  downsample_ratio=o.downsample_ratio))


def check_images(o: ImageOptions) -> None:
    """A tile must be a whole number of LLM tokens; raises at build time, before any image."""
    internvl_image_tokens([1], image_size=o.image_size, patch_size=o.patch_size,
                          downsample_ratio=o.downsample_ratio)


def sglang_image_options(options: dict, hf_config: dict) -> dict:
    """The run's image options as SGLang's processor tiles (ties to the most tiles), so the
    engine samples from the prompts trained on; ConfigError for what it cannot follow (caught
    later, per prompt, as a token-count mismatch otherwise)."""
    fixed = dict(SGLANG_TILING)
    llm = hf_config.get("llm_config") or hf_config.get("text_config") or {}
    if (llm.get("architectures") or [None])[0] != "InternLM2ForCausalLM":
        del fixed["max_tiles"]  # sent with each request
    bad = [f"{'the checkpoint tile size' if k == 'image_size' else 'data.' + k}="
           f"{options[k]} (SGLang: {v})" for k, v in fixed.items()
           if k in options and options[k] != v]
    if bad:
        raise ConfigError(f"rollout.engine=sglang tiles InternVL images its own way: {', '.join(bad)}"
                          "; SGLang 0.5.23's InternVL processor adds the thumbnail, cuts 448-px "
                          "tiles, and with an InternLM2 LLM at most 12 of them")
    return {**options, "ties_to_most_tiles": True}


def tile_size(hf_config: dict) -> int | None:
    """InternVL's tile side in pixels (448 for InternVL2.5/3; `force_image_size` in internvl_chat
    configs, `vision_config.image_size` in transformers-native ones), None when not given."""
    size = hf_config.get("force_image_size") or hf_config.get("vision_config", {}).get("image_size")
    if isinstance(size, (list, tuple)):
        size = size[0]
    return int(size) if size else None


def image_options_from_hf(hf_config: dict, preprocessor: dict) -> dict:
    """What the checkpoint's architecture fixes about its image tokens: the tile size, the ViT
    patch and the pixel shuffle's downsample_ratio (both formats keep these two in the same
    places). The tiling knobs (max tiles, thumbnail) stay the run's."""
    size = tile_size(hf_config)
    options = {"image_size": size} if size else {}
    patch = (hf_config.get("vision_config") or {}).get("patch_size")
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if patch:
        options["patch_size"] = int(patch)
    if hf_config.get("downsample_ratio"):
        options["downsample_ratio"] = float(hf_config["downsample_ratio"])
    return options
