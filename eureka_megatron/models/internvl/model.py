"""InternVL2.5 / InternVL3 / InternVL3.5 on megatron-core: InternViT, pixel shuffle, the mlp1
projector, the LLM (Qwen2, InternLM2 or, for InternVL3.5, Qwen3 with its per-head q/k norms).

InternViT (first pipeline stage only) is built from megatron TransformerLayers, so it is
tensor-parallel like the LLM: a Conv2d patch embedding with bias, a CLS token and a learned
position embedding (bicubic-resized like the reference when tiles are not `image_size`), then
pre-norm layers (LayerNorm for 300M, RMSNorm for 6B) with non-causal attention per tile and layer
scale (h += attn(norm1(h)) * ls1; h += mlp(norm2(h)) * ls2). InternViT-6B's qk-norm is an RMSNorm
over the full width of q / k (all heads), so under TP it all-reduces the sum of squares.

Heads are zero-padded to `vision.padded_heads` (25 -> 32 for 6B): padded heads have zero q/k/v
rows, zero projection columns and zero qk-norm weights, so they add exactly nothing, and the mean
of the qk-norm runs over the real channels only.

After the tower: drop CLS, pixel shuffle (ps_version v2), LayerNorm + MLP projector; the image
embeddings replace the embeddings of the `image_token_id` positions of our GPTModel LLM (1D rope).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import functools

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                           copy_to_tensor_model_parallel_region,
                                           reduce_from_tensor_model_parallel_region,
                                           set_tensor_model_parallel_attributes)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.internvl.config import InternVisionConfig, InternVLConfig
from eureka_megatron.models.llm import build_chunks, build_gpt, stage_flags, transformer_config
from eureka_megatron.models.llm_config import LLMConfig, validate_layout
from eureka_megatron.models.vlm import LanguageModelStages, embed_with_images, vision_layer_spec

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's pixel shuffle (ps_version v2), verbatim: [n, w, h, c] -> [n, w*s, h*s, c/s^2]."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


# --- layer pieces ----------------------------------------------------------------------------


class FullWidthRMSNorm(torch.nn.Module):
    """InternViT-6B's q/k norm: RMSNorm over all heads' channels, on this rank's heads.

    megatron hands it [s, b, local heads, head_dim]; the sum of squares is all-reduced over TP
    (backward too: every rank's output depends on it) and divided by the real width, so zero
    padded heads change nothing. The weight is TP-sharded on dim 0 like the heads (marked as
    megatron marks its own sharded weights: the grad-norm then counts every rank's shard).
    """

    def __init__(self, config, hidden_size: int, eps: float, width: int):
        super().__init__()
        local_heads = config.num_attention_heads // ps.get_tensor_model_parallel_world_size()
        self.weight = torch.nn.Parameter(
            torch.ones(local_heads * hidden_size, dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self.eps, self.width = eps, width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2).float()
        sq = flat.pow(2).sum(-1, keepdim=True)
        sq = reduce_from_tensor_model_parallel_region(copy_to_tensor_model_parallel_region(sq))
        normed = flat * torch.rsqrt(sq / self.width + self.eps)
        return (self.weight * normed.to(x.dtype)).view_as(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return make_sharded_tensors_for_checkpoint(self.state_dict(keep_vars=True), prefix,
                                                   {"weight": 0}, sharded_offsets)


class ColumnParallelLinearNoBias(ColumnParallelLinear):
    """InternViT-6B's qkv has no bias while its other linears do; megatron ties the two."""

    def __init__(self, *args, bias: bool, **kwargs):
        super().__init__(*args, bias=False, **kwargs)


class LayerScaledTransformerLayer(TransformerLayer):
    """A TransformerLayer whose attention and MLP outputs are scaled per channel (ls1, ls2)
    before the residual add; ls1/ls2 are replicated across TP."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name in ("ls1", "ls2"):
            setattr(self, name, torch.nn.Parameter(
                torch.ones(config.hidden_size, dtype=config.params_dtype)))
        self.self_attn_bda = functools.partial(self._scaled_bda, "ls1")
        self.mlp_bda = functools.partial(self._scaled_bda, "ls2")

    def _scaled_bda(self, scale: str, training: bool, fused: bool):
        def bias_dropout_scale_add(x_with_bias, residual, prob):
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return residual + F.dropout(x, p=prob, training=training) * getattr(self, scale)
        return bias_dropout_scale_add


def internvit_layer_spec(v: InternVisionConfig):
    """The shared vision layer + layer scale, no mask, optional bias-free qkv, full-width qk-norm."""
    qk_norm = (ModuleSpec(module=FullWidthRMSNorm, params={"width": v.hidden_size})
               if v.qk_normalization else None)
    return vision_layer_spec(
        layer=LayerScaledTransformerLayer, attn_mask_type=AttnMaskType.no_mask,
        linear_qkv=ColumnParallelLinear if v.qkv_bias else ColumnParallelLinearNoBias,
        qk_norm=qk_norm)


# --- the vision tower and the projector -------------------------------------------------------


class InternViT(MegatronModule):
    """The tower: conv1 patch embedding, CLS token, position table, layer-scaled layers; every
    tile is one sequence of the batch (non-causal attention within a tile)."""

    def __init__(self, v: InternVisionConfig, par: ParallelConfig):
        vcfg = vision_transformer_config(v, par)
        super().__init__(config=vcfg)
        self.v = v
        dtype = vcfg.params_dtype
        self.conv1 = torch.nn.Conv2d(v.num_channels, v.hidden_size, v.patch_size, v.patch_size,
                                     dtype=dtype)
        side = v.image_size // v.patch_size
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, v.hidden_size, dtype=dtype))
        self.position_embedding = torch.nn.Parameter(
            torch.randn(1, side * side + 1, v.hidden_size, dtype=dtype) * 0.02)
        self.decoder = TransformerBlock(vcfg, internvit_layer_spec(v), post_layer_norm=False,
                                        pre_process=True, post_process=False)

    def set_input_tensor(self, tensor) -> None:  # the tower never receives pipeline input
        pass

    def position_embeddings(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1, 1 + grid_h * grid_w, C]: the stored table, bicubic-resized (in fp32, as the
        reference does) when the tile grid differs from the pretraining grid."""
        pos = self.position_embedding
        side = self.v.image_size // self.v.patch_size
        if (grid_h, grid_w) == (side, side):
            return pos
        patches = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        patches = patches.reshape(1, -1, grid_h * grid_w).permute(0, 2, 1).to(pos.dtype)
        return torch.cat([pos[:, :1], patches], dim=1)

    def forward(self, pixel_values: torch.Tensor, num_layers: int) -> torch.Tensor:
        """[tiles, 3, H, W] -> hidden states [1 + patches, tiles, C] after `num_layers` layers."""
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))
        tiles, _, gh, gw = x.shape
        x = torch.cat([self.class_token.expand(tiles, 1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        h = (x + self.position_embeddings(gh, gw)).transpose(0, 1).contiguous()
        for layer in self.decoder.layers[:num_layers]:
            h, _ = layer(h, attention_mask=None)
        return h


class InternVLProjector(MultimodalProjector):
    """mlp1: LayerNorm(4C, eps 1e-5) then Linear (column-parallel), GELU, Linear (row-parallel)."""

    def __init__(self, config, input_size: int):
        super().__init__(config, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                               linear_fc2=RowParallelLinear), "mlp", input_size)
        self.layer_norm = torch.nn.LayerNorm(input_size, eps=1e-5, dtype=config.params_dtype)

    def forward(self, hidden_states):
        return super().forward(self.layer_norm(hidden_states))


def vision_transformer_config(v: InternVisionConfig, par: ParallelConfig):
    base = LLMConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                     num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.padded_heads,
                     num_key_value_heads=v.padded_heads, head_dim=v.head_dim,
                     rms_norm_eps=v.layer_norm_eps, qkv_bias=v.qkv_bias)
    norm = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}[v.norm_type]
    # The tower always lives whole on the first pipeline stage: its config has PP 1.
    return transformer_config(base, par, normalization=norm, gated_linear_unit=False,
                              activation_func=F.gelu, add_bias_linear=True,
                              pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None)


def projector_transformer_config(cfg: InternVLConfig, par: ParallelConfig):
    h = cfg.text.hidden_size
    base = LLMConfig(hidden_size=h, intermediate_size=h, num_hidden_layers=1,
                     # an MLP has no heads; megatron still checks heads % TP
                     num_attention_heads=par.tensor_parallel, num_key_value_heads=par.tensor_parallel)
    return transformer_config(base, par, add_bias_linear=True, gated_linear_unit=False,
                              activation_func=F.gelu, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None)


def validate_internvl_layout(cfg: InternVLConfig, par: ParallelConfig) -> None:
    """The TP divisibility the tower and projector need, checked before megatron asserts."""
    validate_layout(cfg.text, par)
    v, tp = cfg.vision, par.tensor_parallel
    if v.padded_heads % tp:
        raise ConfigError(
            f"vision heads {v.num_attention_heads}, padded to {v.padded_heads} "
            f"(vision.head_pad_multiple={v.head_pad_multiple}), are not divisible by "
            f"parallel.tensor_parallel={tp}: make vision.head_pad_multiple a multiple of {tp}")
    for name, size in (("vision.intermediate_size", v.intermediate_size),
                       ("text.hidden_size (the projector's width)", cfg.text.hidden_size)):
        if size % tp:
            raise ConfigError(f"{name}={size} is not divisible by parallel.tensor_parallel={tp}")


# --- the whole model -------------------------------------------------------------------------


class InternVLModel(LanguageModelStages, MegatronModule):
    """One pipeline chunk of InternVL: [InternViT + projector] + a slice of the LLM."""

    def __init__(self, cfg: InternVLConfig, par: ParallelConfig, vp_stage: int | None = None):
        lm = build_gpt(cfg.text, par, vp_stage, scatter_embeddings=False)
        super().__init__(config=lm.config)
        self.cfg = cfg
        self.pre_process, self.post_process = stage_flags(vp_stage)
        self.vp_stage = vp_stage
        self.language_model = lm
        self.vision_model = self.vision_projection = None
        if self.pre_process:
            self.vision_model = InternViT(cfg.vision, par)
            self.vision_projection = InternVLProjector(
                projector_transformer_config(cfg, par), cfg.vision.hidden_size * cfg.shuffle_factor**2)
            projector_frozen = (cfg.freeze_vision if cfg.freeze_projector is None
                                else cfg.freeze_projector)
            frozen = [*(self.vision_model.parameters() if cfg.freeze_vision else ()),
                      *(self.vision_projection.parameters() if projector_frozen else ())]
            for p in frozen:
                p.requires_grad_(False)
        self.share_embeddings_and_output_weights = lm.share_embeddings_and_output_weights

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, H, W] -> [tiles * tokens per tile, LLM hidden], tile by tile, row-major."""
        tiles, _, height, width = pixel_values.shape
        p, f = self.cfg.vision.patch_size, self.cfg.shuffle_factor
        if height != width or height % (p * f):
            raise ValueError(f"tiles must be square with a side divisible by patch_size * "
                             f"{f} = {p * f}; got {height}x{width}")
        n = self.cfg.vision.num_hidden_layers
        s = self.cfg.select_layer
        h = self.vision_model(pixel_values, s if s >= 0 else n + 1 + s)
        side = height // p
        x = h[1:].transpose(0, 1).reshape(tiles, side, side, -1).contiguous()  # drop CLS
        x = pixel_shuffle(x, self.cfg.downsample_ratio)
        return self.vision_projection(x.reshape(-1, 1, x.shape[-1]))[:, 0]

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None, labels=None,
                image_index=None, packed_seq_params=None):
        """`image_index`: see `vlm.embed_with_images` (rows sharing tiles; trainer.batches);
        `packed_seq_params`: a packed row (models/packed_attention.py)."""
        decoder_input = None
        if self.pre_process:
            images = self.image_embeddings(pixel_values) if pixel_values is not None else None
            decoder_input = embed_with_images(
                self.language_model, input_ids, self.cfg.image_token_id, images,
                f"{pixel_values.shape[0]} tiles" if pixel_values is not None else "", image_index)
        return self.language_model(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params)


def build_internvl_chunks(cfg: InternVLConfig, par: ParallelConfig) -> list[torch.nn.Module]:
    """This rank's InternVL chunks (one per virtual pipeline stage); needs parallel_state."""
    validate_internvl_layout(cfg, par)
    return build_chunks(lambda vp: InternVLModel(cfg, par, vp), par)
