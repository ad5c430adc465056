"""`Prompt`: one prompt as the data pipeline hands it to a rollout engine (the `RolloutEngine`
seam in `rollout/engine.py` takes these); here so that data/ does not depend on rollout/."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Prompt:
    """One prompt as the family's processor produced it.

    input_ids: the prompt token ids, image placeholders already expanded.
    mm_inputs: the processor's tensors for this prompt other than ids (Qwen2.5-VL:
        pixel_values, image_grid_thw; InternVL: pixel_values), for in-process engines.
    images: the original images (PIL or paths), for engines that preprocess themselves (SGLang).
    text: the chat-templated prompt text, for engines that take text.
    max_tiles: the most tiles an image was cut into (InternVL's dynamic tiling), for engines that
        tile the images themselves; None for families that do not tile.
    """
    input_ids: list[int]
    mm_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    text: str | None = None
    max_tiles: int | None = None
