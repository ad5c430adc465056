"""Image preprocessing against independent references: transformers' PIL-backend processors
(Qwen2VLImageProcessorPil; GotOcr2ImageProcessorPil with crop_to_patches, InternVL's HF
processor) -- both run without torchvision -- plus float64 re-derivations of the Qwen patch
layout and InternVL tiles from raw pixels, and hand-computed tiling decisions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil, get_optimal_tiled_canvas)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil, smart_resize as hf_smart_resize)

from eureka_megatron.models.images import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from eureka_megatron.models.internvl.images import (internvl_image_tokens, internvl_pixels,
                                                    internvl_tiles, tile_grid)
from eureka_megatron.models.qwen2_5_vl.images import (qwen2_5_vl_image_tokens, qwen2_5_vl_pixels,
                                                      smart_resize)


def noise(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return im if mode == "RGB" else im.convert(mode).convert("RGB")


# --- Qwen2.5-VL ---------------------------------------------------------------------------


def test_smart_resize_matches_transformers():
    sizes = [(1, 1), (13, 29), (28, 28), (56, 56), (99, 101), (224, 3000), (3000, 224),
             (1080, 1920), (4000, 4000), (41, 8000), (333, 777), (14, 2800)]
    for min_px, max_px in [(56 * 56, 14 * 14 * 4 * 1280), (3136, 28 * 28 * 16), (200_000, 400_000)]:
        for h, w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            got = smart_resize(h, w, factor=28, min_pixels=min_px, max_pixels=max_px)
            assert got == hf_smart_resize(h, w, factor=28, min_pixels=min_px, max_pixels=max_px)
            assert got[0] % 28 == 0 and got[1] % 28 == 0
    # hand-checked, one per branch: rounding fits; too big (sqrt(1080*1920/1003520) = 1.4375,
    # floor(1080/1.4375/28) = 26, floor(1920/1.4375/28) = 47); too small (ceil scaled up)
    assert smart_resize(500, 700) == (504, 700)
    assert smart_resize(1080, 1920) == (26 * 28, 47 * 28)
    assert smart_resize(10, 20) == (56, 84)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2020)


def test_qwen_pixels_match_transformers():
    images = [noise(100, 150, 0), noise(37, 300, 1), noise(500, 90, 2), noise(20, 20, 3),
              noise(64, 64, 4, mode="L")]
    kw = dict(min_pixels=56 * 56, max_pixels=14 * 14 * 4 * 64)
    pixels, grid = qwen2_5_vl_pixels(images, **kw)
    ref = Qwen2VLImageProcessorPil(**kw)(images, return_tensors="pt")
    assert pixels.dtype == torch.float32 and grid.dtype == torch.long
    assert torch.equal(grid, ref["image_grid_thw"])
    assert pixels.shape == ref["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    torch.testing.assert_close(pixels, ref["pixel_values"], rtol=0, atol=1e-6)
    assert qwen2_5_vl_image_tokens(grid) == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]


def test_qwen_patch_layout_float64_rederivation():
    """Patch k is the 14x14 block the merger expects: 2x2 merge windows in raster order, the
    patches of a window in raster order, each as [C, T, 14, 14] with both frames the image."""
    im = noise(90, 130, 7)
    pixels, grid = qwen2_5_vl_pixels([im], min_pixels=56 * 56, max_pixels=10**6)
    _, gh, gw = grid[0].tolist()
    resized = np.asarray(im.resize((gw * 14, gh * 14), Image.Resampling.BICUBIC), dtype=np.float64)
    x = (resized / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)  # [H, W, C], float64
    k = 0
    for wy in range(gh // 2):
        for wx in range(gw // 2):
            for dy in range(2):
                for dx in range(2):
                    y0, x0 = (2 * wy + dy) * 14, (2 * wx + dx) * 14
                    block = x[y0:y0 + 14, x0:x0 + 14].transpose(2, 0, 1)  # [C, 14, 14]
                    expect = np.stack([block, block], axis=1).reshape(-1)  # [C, T, 14, 14]
                    np.testing.assert_allclose(pixels[k].numpy(), expect, rtol=0, atol=1e-5)
                    k += 1
    assert k == pixels.shape[0] == gh * gw
    assert qwen2_5_vl_image_tokens(grid) == [gh * gw // 4]


# --- InternVL ------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h,kw,grid", [
    (448, 448, {}, (1, 1)),
    (896, 448, {}, (2, 1)),           # (4, 2) ties on ratio but the image is not big enough
    (1792, 896, {}, (4, 2)),          # ... here it is: area 1.6M > 0.5 * 448^2 * 8
    (100, 100, {}, (1, 1)),           # (2,2), (3,3) tie, image far too small
    (2000, 2000, {}, (3, 3)),         # (4,4) would be 16 > 12 tiles
    (3000, 100, {}, (12, 1)),         # as wide as allowed
    (100, 3000, {"max_tiles": 6}, (1, 6)),
    (600, 400, {"max_tiles": 2}, (2, 1)),   # 1x1 and 2x1 tie at |1.5-r| = 0.5; area 240k > 200,704
    (300, 200, {"max_tiles": 2}, (1, 1)),   # same tie, area 60k: stay at one tile
    (448, 448, {"min_tiles": 2}, (2, 2)),
    (1000, 700, {"max_tiles": 1}, (1, 1)),
    # SGLang's tie rule: a tie always goes to more tiles (tests/sglang_api: its own code)
    (100, 100, {"ties_to_most_tiles": True}, (3, 3)),
    (896, 448, {"ties_to_most_tiles": True}, (4, 2)),
    (300, 200, {"max_tiles": 2, "ties_to_most_tiles": True}, (2, 1)),
])
def test_tile_grid_hand_computed(w, h, kw, grid):
    assert tile_grid(w, h, image_size=448, **kw) == grid


def test_tile_grid_matches_transformers_sweep():
    rng = np.random.default_rng(0)
    for _ in range(400):
        w, h = (int(v) for v in rng.integers(8, 4000, 2))
        lo, hi = sorted(int(v) for v in rng.integers(1, 13, 2))
        size = int(rng.choice([224, 448]))
        assert tile_grid(w, h, image_size=size, min_tiles=lo, max_tiles=hi) == \
            get_optimal_tiled_canvas((h, w), (size, size), lo, hi), (w, h, lo, hi, size)


def test_internvl_tiles_are_crops_of_the_resized_image():
    im = noise(60, 250, 5)  # aspect ~4.2 -> (4, 1) at max_tiles 12
    tiles = internvl_tiles(im, image_size=56, max_tiles=12, use_thumbnail=True)
    cols, rows = tile_grid(250, 60, image_size=56, max_tiles=12)
    assert (cols, rows) == (4, 1) and len(tiles) == cols * rows + 1
    big = np.asarray(im.resize((cols * 56, rows * 56), Image.Resampling.BICUBIC))
    for i, t in enumerate(tiles[:-1]):
        r, c = divmod(i, cols)
        assert t.size == (56, 56)
        assert np.array_equal(np.asarray(t), big[r * 56:(r + 1) * 56, c * 56:(c + 1) * 56])
    thumb = np.asarray(im.resize((56, 56), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[-1]), thumb)
    assert len(internvl_tiles(im, image_size=56, use_thumbnail=False)) == 4
    assert len(internvl_tiles(noise(56, 56), image_size=56)) == 1  # one tile: no thumbnail


def test_internvl_pixels_match_transformers_got_ocr2():
    images = [noise(100, 150, 0), noise(37, 300, 1), noise(500, 90, 2), noise(20, 20, 3)]
    ref_proc = GotOcr2ImageProcessorPil(crop_to_patches=True, min_patches=1, max_patches=12,
                                        size={"height": 448, "width": 448},
                                        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    ref = ref_proc(images, return_tensors="pt")
    pixels, tiles = internvl_pixels(images, image_size=448, max_tiles=12, use_thumbnail=True)
    assert tiles == ref["num_patches"].tolist() == [7, 9, 7, 1]
    assert pixels.dtype == torch.float32 and pixels.shape == (24, 3, 448, 448)
    torch.testing.assert_close(pixels, ref["pixel_values"], rtol=0, atol=1e-6)


def test_internvl_pixels_float64_normalisation_and_tokens():
    im = noise(70, 120, 9)
    pixels, tiles = internvl_pixels([im], image_size=56, max_tiles=4)
    raw = internvl_tiles(im, image_size=56, max_tiles=4)
    assert tiles == [len(raw)] and pixels.shape == (len(raw), 3, 56, 56)
    for p, t in zip(pixels, raw):
        x = (np.asarray(t, dtype=np.float64) / 255 - IMAGENET_MEAN) / IMAGENET_STD
        np.testing.assert_allclose(p.numpy(), x.transpose(2, 0, 1), rtol=0, atol=1e-5)
    # tokens per tile: (448/14)^2 patches, pixel shuffle 0.5 -> 256 (InternVL2.5's number)
    assert internvl_image_tokens([1, 7], image_size=448) == [256, 1792]
    assert internvl_image_tokens([3], image_size=56, patch_size=14, downsample_ratio=0.5) == [12]
    with pytest.raises(ValueError, match="whole number"):
        internvl_image_tokens([1], image_size=42, patch_size=14, downsample_ratio=0.5)
