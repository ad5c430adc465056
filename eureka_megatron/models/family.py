"""What one model family is, end to end: everything the trainer, converter, engines and data
pipeline need to know about it, in one object per family (`models/<family>/__init__.py`), found
through `models/registry.py`. Adding a family is one package and one registry line."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from eureka_megatron.models.images import ImageOptions

if TYPE_CHECKING:
    import torch


class TensorNames(set):
    """A state dict's tensor names that also tell each tensor's shape (`shape(name)`), for the
    layouts names alone cannot tell (Qwen3-VL-MoE's expert stacks: transformers' in-memory
    [E, 2I, H] and the hub's transposed [E, H, 2I] share their names). `HFCheckpoint.names` is
    one (shapes from the safetensors headers); `of(state_dict)` makes one from tensors."""

    def __init__(self, names=(), shape: Callable[[str], tuple[int, ...]] | None = None):
        super().__init__(names)
        self._shape = shape

    @classmethod
    def of(cls, tensors: dict) -> "TensorNames":
        return cls(tensors, lambda name: tuple(tensors[name].shape))

    def shape(self, name: str) -> tuple[int, ...] | None:
        return None if self._shape is None else tuple(self._shape(name))


@dataclass(frozen=True)
class ChatTokens:
    """The special strings of one model family's chat and image markup."""
    im_start: str
    im_end: str
    image_start: str
    image_pad: str      # repeated once per LLM token of the image
    image_end: str
    image_sep: str = ""  # after an image placed in front of the question


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]                 # HF config.json `model_type`s it reads
    config_from_hf: Callable[[dict, Path | None], Any]  # (config.json, dir with tokenizer files)
    # HF tensor names -> naming layout; a checkpoint's names are `TensorNames` (shapes on request)
    detect_layout: Callable[[set[str]], str]
    mapping: Callable[[Any, str], Any]           # (cfg, layout) -> the reversible Mapping
    build_chunks: Callable[[Any, Any], list]     # (cfg, ParallelConfig) -> megatron chunks
    prepare: Callable[[Any, dict], dict]         # (cfg, HF processor output) -> micro-batch
    call: Callable[[Any, torch.nn.Module, dict], torch.Tensor]  # (cfg, chunk, mb) -> output
    hf_model_type: str                           # the model_type transformers builds (HF engine)
    hf_class: str                                # its transformers class
    hf_layout: str                               # that class's in-memory naming layout
    # VLMs: how prompts write images, pixels + LLM tokens per image, and the options a checkpoint
    # sets (None for text models)
    chat: ChatTokens | None = None
    image_inputs: Callable[[list, ImageOptions], tuple[dict, list[int]]] | None = None
    # (config.json, preprocessor_config.json or {}) -> the ImageOptions fields the checkpoint fixes
    image_options_from_hf: Callable[[dict, dict], dict] = lambda hf_config, preprocessor: {}
    check_images: Callable[[ImageOptions], None] = lambda options: None  # fail before any image
    tiles_images: bool = False  # images cut into tiles (InternVL): prompts carry max_tiles
    # (the run's image options, config.json) -> the options that preprocess as SGLang's own
    # processor does (InternVL: its tie rule), or ConfigError for what it cannot follow
    sglang_image_options: Callable[[dict, dict], dict] = lambda options, hf_config: options
    # (model cfg, ParallelConfig) -> None: the family's own layout rules beyond the LLM's
    # (`validate_layout`), checked before any rank starts; raises ConfigError
    check_layout: Callable[[Any, Any], None] = lambda cfg, parallel: None
    sglang_image_placeholder: str | None = None  # what SGLang's processor matches as one image
    # (model cfg, the run's `model:` section) -> the cfg with what that section freezes
    trainable: Callable[[Any, Any], Any] = lambda cfg, model_section: cfg

    @property
    def is_vlm(self) -> bool:
        return self.image_inputs is not None
