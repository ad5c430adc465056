"""Image decoding: one function, `load_image(path) -> RGB PIL image`, errors naming the file.

PIL decodes everywhere. When NVIDIA DALI imports (GPU hosts), JPEGs go through DALI's decoder
instead (nvJPEG on a GPU, libjpeg-turbo on CPU), which is where decode time goes on a cluster;
PNG and other formats stay on PIL, so alpha handling is identical on every host. Set
EUREKA_MEGATRON_DALI=0 to force PIL: DALI's JPEG output can differ from PIL's by a grey level
on a few pixels, and rollout engines that decode the file themselves use PIL.

Transparent images are composited over white before dropping alpha (what qwen-vl-utils and
transformers' convert_to_rgb do), so a transparent diagram does not turn black.
"""
from __future__ import annotations

import functools
import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from eureka_megatron.data.jsonl import DataError

__all__ = ["DataError", "load_image", "to_rgb"]

_JPEG_MAGIC = b"\xff\xd8\xff"
_DALI_LOCK = threading.Lock()  # one pipeline, fed and run as a pair


def load_image(path: str | os.PathLike | Image.Image) -> Image.Image:
    """Decode `path` into an RGB PIL image (a PIL image passed in is converted to RGB)."""
    if isinstance(path, Image.Image):
        return to_rgb(path)
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"image not found: {p}") from None
    except OSError as e:
        raise DataError(f"cannot read image {p}: {e}") from None
    if raw.startswith(_JPEG_MAGIC) and _dali_enabled():
        try:
            return _dali_decode(raw)
        except Exception:  # fall back to PIL, which then names the problem
            pass
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            return to_rgb(im)
    except UnidentifiedImageError:
        raise DataError(f"corrupt or unsupported image {p}: not a format PIL can read") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"corrupt or unsupported image {p}: {e}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy; anything with transparency is composited over white first."""
    if im.mode == "RGB":
        return im.copy()
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


# --- DALI (only on hosts where nvidia.dali imports; not exercised by the CPU test suite) ----


@functools.lru_cache(maxsize=None)
def _dali_enabled() -> bool:
    if os.environ.get("EUREKA_MEGATRON_DALI", "1") == "0":
        return False
    try:
        import nvidia.dali  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _dali_pipeline():
    import torch
    from nvidia.dali import fn, pipeline_def, types

    gpu = torch.cuda.is_available()

    @pipeline_def(batch_size=1, num_threads=1, device_id=torch.cuda.current_device() if gpu else None)
    def decode():
        data = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    return pipe


def _dali_decode(raw: bytes) -> Image.Image:
    with _DALI_LOCK:
        pipe = _dali_pipeline()
        pipe.feed_input("encoded", [np.frombuffer(raw, dtype=np.uint8)])
        (out,) = pipe.run()
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    return Image.fromarray(np.asarray(out.at(0)), mode="RGB")
