"""Qwen2.5-VL on megatron-core: a Megatron-native vision tower and the mrope LLM.

Vision tower (first pipeline stage only): patch embedding (the Conv3d with kernel = stride is a
linear map of the 1176 values of a patch), 2D rotary embeddings, window attention with full
attention at `fullatt_block_indexes`, RMSNorm (eps 1e-6), a SiLU-gated MLP with bias, and the
patch merger (RMSNorm per patch, 2x2 merge, GELU MLP). Its layers are megatron TransformerLayers,
so they are tensor-parallel like the LLM's. Patches of all images are packed into one sequence in
window order; attention is restricted by a block-diagonal mask (one block per window, or per
image in the full-attention layers).

The LLM is our Qwen2.5 GPTModel with 3D mrope; image embeddings replace the embeddings of the
image-token positions before the first decoder layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from eureka_megatron.models.llm import build_chunks, build_gpt, stage_flags, transformer_config
from eureka_megatron.models.llm_config import LLMConfig
from eureka_megatron.models.qwen2_5_vl.config import Qwen25VisionConfig, Qwen25VLConfig
from eureka_megatron.models.vlm import LanguageModelStages, embed_with_images, vision_layer_spec

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


# --- the index arithmetic of Qwen2.5-VL (pure functions, tested against transformers) ----------


def vision_rope_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) grid coordinates of every patch, ordered merge-block by merge-block: [N, 2]."""
    out = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # block order: (h-block, w-block, row-in-block, col-in-block)
        pos = torch.stack([hh.permute(0, 2, 1, 3).reshape(-1), ww.permute(0, 2, 1, 3).reshape(-1)], -1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


def window_partition(grid_thw: torch.Tensor, merge: int, window: int, patch: int):
    """Window order of the merged tokens and the window boundaries (in patches).

    Returns (order [M], window_bounds [W+1]): `order` lists merged-token indices window by window
    (each image's windows tile its merged grid in `window // merge // patch` squares, cut at the
    right and bottom edges); `window_bounds` are cumulative patch counts at window ends.
    """
    side = window // merge // patch
    order, bounds, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r0 in range(0, gh, side):
                for c0 in range(0, gw, side):
                    block = idx[ti, r0:r0 + side, c0:c0 + side].reshape(-1)
                    order.append(block + offset)
                    bounds.append(bounds[-1] + block.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), torch.tensor(bounds)


def image_bounds(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts at the end of every image frame (the full-attention blocks)."""
    sizes = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    return torch.tensor([0] + sizes).cumsum(0)


def block_diagonal_mask(bounds: torch.Tensor, n: int, device=None) -> torch.Tensor:
    """[1, 1, n, n] bool, True where attention is *not* allowed (megatron's convention)."""
    seg = torch.bucketize(torch.arange(n, device=device), bounds[1:].to(device), right=True)
    return (seg[:, None] != seg[None, :])[None, None]


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       image_token_id: int, merge: int,
                       attention_mask: torch.Tensor | None = None,
                       cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Qwen2.5-VL's 3D positions [3, B, S]: text counts up on all three axes; an image's tokens
    take (t, row, col) offsets from the running position, which then advances by the longer side
    of its merged grid. Padding (attention_mask 0) gets position 0 and is skipped.

    Packed sequences: with `cu_seqlens` (cumulative sample boundaries of a [1, S] row, as in
    megatron's THD packing) every sample starts again from position 0, exactly as if it were
    alone; images are consumed in order across samples."""
    B, S = input_ids.shape
    pos = torch.zeros(3, B, S, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"cu_seqlens describes one packed row; input_ids has {B} rows")
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] > S or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens {bounds} is not increasing from 0 to at most {S}")
        for a, b in zip(bounds, bounds[1:]):
            pos[:, 0, a:b] = _row_positions(input_ids[0, a:b], grids, image_token_id, merge)
        return pos
    for b in range(B):
        keep = attention_mask[b].bool() if attention_mask is not None else torch.ones(S, dtype=torch.bool)
        pos[:, b, keep] = _row_positions(input_ids[b][keep], grids, image_token_id, merge)
    return pos


def _row_positions(ids: torch.Tensor, grids, image_token_id: int, merge: int) -> torch.Tensor:
    cols, cur, i = [], 0, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            t, h, w = next(grids)
            gh, gw = h // merge, w // merge
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw),
                                        indexing="ij")
            cols.append(torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + cur)
            i += t * gh * gw
            cur += max(gh, gw)
        else:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            cols.append(torch.arange(cur, cur + j - i).expand(3, -1))
            cur += j - i
            i = j
    return torch.cat(cols, dim=1) if cols else torch.zeros(3, 0, dtype=torch.long)


# --- the vision tower ----------------------------------------------------------------------


class PatchEmbed(torch.nn.Module):
    """HF's Conv3d patch embedding as the linear map it is (kernel = stride); same weight shape."""

    def __init__(self, v: Qwen25VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.proj = _PatchProjection(torch.empty(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size, dtype=dtype))
        torch.nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class _PatchProjection(torch.nn.Module):
    """The Conv3d weight applied as a linear map. Its own module, called: megatron's overlapped
    parameter all-gather waits for a parameter in the forward pre-hook of the module that owns
    it, so a weight read through a parent's forward could be used before it arrived."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1))


class Qwen25VisionModel(MegatronModule):
    def __init__(self, v: Qwen25VisionConfig, par: ParallelConfig):
        # The tower always lives whole on the first pipeline stage: its config has PP 1.
        vcfg = transformer_config_for_vision(v, par)
        super().__init__(config=vcfg)
        self.v = v
        self.patch_embed = PatchEmbed(v, vcfg.params_dtype)
        self.decoder = TransformerBlock(vcfg, vision_layer_spec(), post_layer_norm=False,
                                        pre_process=True, post_process=False)
        self.ln_q = torch.nn.RMSNorm(v.hidden_size, eps=1e-6, dtype=vcfg.params_dtype)
        unit = v.spatial_merge_size**2
        pcfg = transformer_config_for_projector(v, par)
        self.projection = MultimodalProjector(
            pcfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            "mlp", unit * v.hidden_size)
        head_dim = v.hidden_size // v.num_heads
        quarter = head_dim // 2
        self.register_buffer("inv_freq", 1.0 / v.rope_theta ** (
            torch.arange(0, quarter, 2, dtype=torch.float32) / quarter), persistent=False)

    def set_input_tensor(self, tensor) -> None:  # the tower never receives pipeline input
        pass

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[patches, 1176] pixels -> [patches / 4, LLM hidden] image embeddings, in image order."""
        v, dev = self.v, pixel_values.device
        unit = v.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        order, win_bounds = window_partition(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
        order = order.to(dev)
        x = x.view(n // unit, unit, -1)[order].reshape(n, -1)
        pos = vision_rope_positions(grid_thw, v.spatial_merge_size).to(dev)
        pos = pos.view(n // unit, unit, 2)[order].reshape(n, 2)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [n, head_dim / 2]
        rotary = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        masks = {True: block_diagonal_mask(image_bounds(grid_thw), n, dev),
                 False: block_diagonal_mask(win_bounds, n, dev)}
        h = x[:, None, :]
        for i, layer in enumerate(self.decoder.layers):
            h, _ = layer(h, attention_mask=masks[i in v.fullatt_block_indexes], rotary_pos_emb=rotary)
        h = self.ln_q(h[:, 0]).view(n // unit, 1, unit * v.hidden_size)
        out = self.projection(h)[:, 0]
        return out[torch.argsort(order)]


def transformer_config_for_vision(v: Qwen25VisionConfig, par: ParallelConfig):
    base = LLMConfig(hidden_size=v.hidden_size, intermediate_size=v.padded_intermediate_size,
                     num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                     num_key_value_heads=v.num_heads, rms_norm_eps=1e-6)
    return transformer_config(base, par, add_bias_linear=True, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None)


def transformer_config_for_projector(v: Qwen25VisionConfig, par: ParallelConfig):
    unit = v.spatial_merge_size**2
    base = LLMConfig(hidden_size=v.out_hidden_size, intermediate_size=unit * v.hidden_size,
                     num_hidden_layers=1,
                     # an MLP has no heads; megatron still checks heads % TP
                     num_attention_heads=par.tensor_parallel, num_key_value_heads=par.tensor_parallel)
    return transformer_config(base, par, add_bias_linear=True, gated_linear_unit=False,
                              activation_func=F.gelu, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None)


# --- the whole model -------------------------------------------------------------------------


class Qwen25VLModel(LanguageModelStages, MegatronModule):
    """One pipeline chunk of Qwen2.5-VL: [vision tower +] a slice of the mrope LLM."""

    def __init__(self, cfg: Qwen25VLConfig, par: ParallelConfig, vp_stage: int | None = None):
        lm = build_gpt(cfg.text, par, vp_stage, mrope_section=cfg.mrope_section,
                       scatter_embeddings=False)
        super().__init__(config=lm.config)
        self.cfg = cfg
        self.pre_process, self.post_process = stage_flags(vp_stage)
        self.vp_stage = vp_stage
        self.language_model = lm
        self.vision_model = Qwen25VisionModel(cfg.vision, par) if self.pre_process else None
        if self.vision_model is not None and cfg.freeze_vision:
            for p in self.vision_model.parameters():
                p.requires_grad_(False)
        self.share_embeddings_and_output_weights = lm.share_embeddings_and_output_weights

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
                image_grid_thw=None, labels=None, image_index=None, packed_seq_params=None):
        """`image_index`: see `vlm.embed_with_images` (rows sharing images; trainer.batches);
        `packed_seq_params`: a packed row (models/packed_attention.py)."""
        decoder_input = None
        if self.pre_process:
            images = (self.vision_model(pixel_values, image_grid_thw)
                      if pixel_values is not None else None)
            decoder_input = embed_with_images(self.language_model, input_ids,
                                              self.cfg.image_token_id, images,
                                              image_index=image_index)
        return self.language_model(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params)


def build_qwen2_5_vl_chunks(cfg: Qwen25VLConfig, par: ParallelConfig) -> list[torch.nn.Module]:
    return build_chunks(lambda vp: Qwen25VLModel(cfg, par, vp), par)
