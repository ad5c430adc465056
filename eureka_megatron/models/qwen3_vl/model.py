"""Qwen3-VL on megatron-core: a Megatron-native vision tower with DeepStack, and an LLM with
interleaved mrope.

Vision tower (first pipeline stage only): patch embedding (the Conv3d with kernel = stride, with
bias, as a linear map), plus a learned square position table bilinearly resampled
(align_corners) to each image's patch grid, in merge-block order; 2D rotary embeddings; full
attention within each image (a block-diagonal mask over the packed patches; no windows);
LayerNorm (eps 1e-6) and a GELU-tanh MLP with biases; the merger (LayerNorm per patch, 2x2 merge,
fc1 - GELU - fc2). Its layers are megatron TransformerLayers, tensor-parallel like the LLM's.

DeepStack: the outputs of blocks `deepstack_visual_indexes` go through mergers of their own
(LayerNorm after the 2x2 merge) and are added to the LLM's hidden states at the image-token
positions after LLM layers 0..len-1 (after layer k's output, feature k). The features ride
through megatron's decoder as its `context` (with `context_mask` = their positions): megatron hands
both to every layer, saves them with the layer inputs under activation recompute and returns
`context` unchanged from self-attention-only layers; a forward hook on each of the first layers
adds its feature. So the addition is part of the layer's forward: recomputed with it, and
carried per micro-batch by the pipeline schedule's own calls. Under sequence parallelism each
TP rank adds the rows of its slice of the sequence; the features' gradient is the sum over TP
(`_RowsOfThisRank`), as the tower (replicated over TP) needs.

LLM: any GPTModel `build_gpt` makes from `cfg.text` (Qwen3's dense decoder here, MoE for
Qwen3-VL-MoE) with megatron's mrope rotary module swapped for `InterleavedMRoPE`. Image
embeddings replace the image-token embeddings before the first decoder layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock

from eureka_megatron.errors import ConfigError
from eureka_megatron.models.llm import build_chunks, build_gpt, stage_flags, transformer_config
from eureka_megatron.models.llm_config import LLMConfig
# Qwen3-VL's 3-D positions for images are Qwen2.5-VL's (get_rope_index differs for videos only:
# Qwen3-VL splits a video into 1-frame grids separated by timestamps), so they are reused.
from eureka_megatron.models.qwen2_5_vl.model import (block_diagonal_mask, image_bounds,
                                                     mrope_position_ids,
                                                     transformer_config_for_projector,
                                                     vision_rope_positions)
from eureka_megatron.models.qwen3_vl.config import (Qwen3VLConfig, Qwen3VLVisionConfig,
                                                    validate_qwen3_vl_layout)
from eureka_megatron.models.vlm import LanguageModelStages, embed_with_images, vision_layer_spec

if TYPE_CHECKING:
    from eureka_megatron.config import ParallelConfig


# --- index arithmetic (pure functions, tested against transformers) ---------------------------


def position_interpolation(grid_thw: torch.Tensor, side: int, merge: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned `side` x `side` position table resampled to every image's patch grid:
    bilinear with align_corners (grid corners map to table corners), patches in merge-block
    order. Returns (indices [N, 4] into the flattened table, weights [N, 4] float32); patch n's
    embedding is sum_j table[indices[n, j]] * weights[n, j]."""
    idx, wts = [], []
    for t, h, w in grid_thw.tolist():
        pos = vision_rope_positions(torch.tensor([[t, h, w]]), merge)  # (row, col) per patch
        rows, row_w = _axis_taps(pos[:, 0], h, side)
        cols, col_w = _axis_taps(pos[:, 1], w, side)
        idx.append((rows[:, :, None] * side + cols[:, None, :]).reshape(-1, 4))
        wts.append((row_w[:, :, None] * col_w[:, None, :]).reshape(-1, 4))
    return torch.cat(idx), torch.cat(wts)


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear interpolation along one axis of `size` patches from `side` table entries: the two
    taps (floor, floor + 1, clamped to the table) and their hat-kernel weights, in float32."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def interleaved_axes(half_dim: int, mrope_section: list[int]) -> torch.Tensor:
    """Which position axis (0 T, 1 H, 2 W) rotates each of the head_dim / 2 rope frequencies:
    H at channels 1, 4, 7, .. below 3 * section[1], W at 2, 5, 8, .. below 3 * section[2], T
    everywhere else (for [24, 20, 20]: T H W T H W .. then T for the last 4)."""
    axis = torch.zeros(half_dim, dtype=torch.long)
    for a in (1, 2):
        axis[a:mrope_section[a] * 3:3] = a
    return axis


class InterleavedMRoPE(torch.nn.Module):
    """Qwen3-VL's multimodal rope, in place of megatron's `MultimodalRotaryEmbedding` (which
    gives each axis one contiguous block of frequencies): the same call and the same output
    [S, B, 1, head_dim] of angles (megatron's non-interleaved rotate-half layout), with the
    frequencies interleaved across T, H, W. Packed rows (THD) pass their [3, 1, T] positions as
    they are; megatron's THD rope takes a per-token table."""

    def __init__(self, head_dim: int, rope_theta: float, mrope_section: list[int]):
        super().__init__()
        # plain attributes, not buffers: Float16Module would round buffers to bf16
        self.inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32)
                                              / head_dim))
        self.axis = interleaved_axes(head_dim // 2, mrope_section)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        if cp_group is not None and cp_group.size() > 1:
            raise NotImplementedError("Qwen3-VL's interleaved mrope does not support context "
                                      "parallelism")
        dev = position_ids.device
        if self.inv_freq.device != dev:
            self.inv_freq, self.axis = self.inv_freq.to(dev), self.axis.to(dev)
        pos = position_ids[self.axis]  # [head_dim / 2, B, S]: each channel's axis
        freqs = pos.permute(2, 1, 0).float() * self.inv_freq  # [S, B, head_dim / 2]
        return torch.cat([freqs, freqs], dim=-1)[:, :, None, :]


# --- the vision tower ----------------------------------------------------------------------


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' gelu_pytorch_tanh."""
    return F.gelu(x, approximate="tanh")


class PatchEmbed(torch.nn.Module):
    """HF's Conv3d patch embedding (kernel = stride, with bias) as the linear map it is; the
    weight keeps the Conv3d shape."""

    def __init__(self, v: Qwen3VLVisionConfig, dtype: torch.dtype):
        super().__init__()
        self.proj = _PatchProjection(
            torch.empty(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size,
                        v.patch_size, dtype=dtype),
            torch.zeros(v.hidden_size, dtype=dtype))
        torch.nn.init.normal_(self.proj.weight, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values)


class _PatchProjection(torch.nn.Module):
    """The Conv3d weight and bias applied as a linear map. Its own module, called: megatron's
    overlapped parameter all-gather waits for a parameter in the forward pre-hook of the module
    that owns it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return F.linear(pixel_values.to(w.dtype), w.reshape(w.shape[0], -1), self.bias)


class PositionTable(torch.nn.Embedding):
    """The learned position table (HF's `pos_embed`), read by interpolation taps."""

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (super().forward(indices) * weights[:, :, None]).sum(1)


class PatchMerger(MegatronModule):
    """LayerNorm, 2x2 merge (4 consecutive patches, merge-block order), fc1 - GELU - fc2.
    `postshuffle`: the norm after the merge, over 4 x hidden (DeepStack's mergers); else before,
    per patch (the main merger)."""

    def __init__(self, v: Qwen3VLVisionConfig, par: ParallelConfig, postshuffle: bool):
        pcfg = transformer_config_for_projector(v, par)
        super().__init__(config=pcfg)
        self.postshuffle = postshuffle
        self.unit_size = v.spatial_merge_size**2 * v.hidden_size
        self.norm = torch.nn.LayerNorm(self.unit_size if postshuffle else v.hidden_size,
                                       eps=v.layer_norm_eps, dtype=pcfg.params_dtype)
        self.projection = MultimodalProjector(
            pcfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            "mlp", self.unit_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[patches, hidden] -> [patches / 4, LLM hidden]."""
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.unit_size))
        else:
            x = self.norm(x).reshape(-1, self.unit_size)
        return self.projection(x[:, None])[:, 0]


class MergerList(MegatronModule):
    """DeepStack's mergers, children "0", "1", ..: a MegatronModule, so their tensor-parallel
    shards keep their sharding in checkpoints (a torch ModuleList would count as replicated)."""

    def __init__(self, config, mergers: list[PatchMerger]):
        super().__init__(config=config)
        for j, m in enumerate(mergers):
            self.add_module(str(j), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, j: int) -> PatchMerger:
        return self._modules[str(j)]


class Qwen3VLVisionModel(MegatronModule):
    def __init__(self, v: Qwen3VLVisionConfig, par: ParallelConfig):
        # The tower always lives whole on the first pipeline stage: its config has PP 1.
        vcfg = transformer_config_for_vision(v, par)
        super().__init__(config=vcfg)
        self.v = v
        self.patch_embed = PatchEmbed(v, vcfg.params_dtype)
        self.pos_embed = PositionTable(v.num_position_embeddings, v.hidden_size,
                                       dtype=vcfg.params_dtype)
        torch.nn.init.normal_(self.pos_embed.weight, std=0.02)
        self.decoder = TransformerBlock(vcfg, vision_layer_spec(), post_layer_norm=False,
                                        pre_process=True, post_process=False)
        self.merger = PatchMerger(v, par, postshuffle=False)
        self.deepstack_mergers = MergerList(vcfg, [PatchMerger(v, par, postshuffle=True)
                                                   for _ in v.deepstack_visual_indexes])
        quarter = v.head_dim // 2
        # a plain attribute, not a buffer: Float16Module would round buffers to bf16
        self.inv_freq = 1.0 / v.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32)
                                               / quarter)

    def set_input_tensor(self, tensor) -> None:  # the tower never receives pipeline input
        pass

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[patches, 3*T*P*P] pixels -> ([patches / 4, LLM hidden] image embeddings, one
        [patches / 4, LLM hidden] DeepStack feature per `deepstack_visual_indexes`), in image
        order."""
        v, dev = self.v, pixel_values.device
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        taps, weights = position_interpolation(grid_thw, v.num_grid_per_side, v.spatial_merge_size)
        x = x + self.pos_embed(taps.to(dev), weights.to(dev)).to(x.dtype)
        pos = vision_rope_positions(grid_thw, v.spatial_merge_size).to(dev)
        freqs = (pos[..., None].float() * self.inv_freq.to(dev)).flatten(1)  # [n, head_dim / 2]
        rotary = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        mask = block_diagonal_mask(image_bounds(grid_thw), n, dev)  # full attention per image
        h = x[:, None, :]
        deepstack = []
        for i, layer in enumerate(self.decoder.layers):
            h, _ = layer(h, attention_mask=mask, rotary_pos_emb=rotary)
            if i in v.deepstack_visual_indexes:
                j = v.deepstack_visual_indexes.index(i)
                deepstack.append(self.deepstack_mergers[j](h[:, 0]))
        return self.merger(h[:, 0]), deepstack


def transformer_config_for_vision(v: Qwen3VLVisionConfig, par: ParallelConfig):
    base = LLMConfig(hidden_size=v.hidden_size, intermediate_size=v.padded_intermediate_size,
                     num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
                     num_key_value_heads=v.num_heads, rms_norm_eps=v.layer_norm_eps)
    return transformer_config(base, par, normalization="LayerNorm", add_bias_linear=True,
                              add_qkv_bias=True, qk_layernorm=False, gated_linear_unit=False,
                              activation_func=gelu_tanh, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None)



# --- DeepStack ---------------------------------------------------------------------------------


class _RowsOfThisRank(torch.autograd.Function):
    """features[:, lo:hi] (this sequence-parallel rank's rows); backward: the rows' gradients
    in place, zeros elsewhere, summed over the TP group -- every TP rank then holds the whole
    gradient, as the tower's tensor-parallel backward (replicated activations) expects."""

    @staticmethod
    def forward(ctx, x, lo: int, hi: int, group):
        ctx.shape, ctx.lo, ctx.hi, ctx.group = x.shape, lo, hi, group
        return x[:, lo:hi].contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        full[:, ctx.lo:ctx.hi] = grad
        torch.distributed.all_reduce(full, group=ctx.group)
        return full, None, None, None


def deepstack_block_kwargs(input_ids: torch.Tensor, image_token_id: int,
                           features: list[torch.Tensor], image_index: torch.Tensor | None = None,
                           sequence_parallel: bool = False) -> dict:
    """The decoder's `context` (features [levels, n, H]) and `context_mask` (their positions
    [2, n]: sequence index in this rank's slice, batch index) for the DeepStack hooks.

    Image tokens take the features in the order `embed_with_images` fills them (row by row);
    `image_index`: rows share images (see `vlm.embed_with_images`)."""
    x = torch.stack(features)
    if image_index is not None:
        x = torch.index_select(x, 1, image_index.to(x.device))
    b, s = (input_ids == image_token_id).nonzero(as_tuple=True)  # row-major: the fill order
    if b.numel() != x.shape[1]:
        raise ValueError(f"{b.numel()} image tokens (id {image_token_id}) in input_ids but the "
                         f"DeepStack mergers give {x.shape[1]} embeddings")
    if sequence_parallel:
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        per = input_ids.shape[1] // tp
        order = torch.argsort(s, stable=True)  # by sequence position: each rank's rows contiguous
        s, b = s[order], b[order]
        x = torch.index_select(x, 1, order)
        lo = int(torch.searchsorted(s, rank * per))
        hi = int(torch.searchsorted(s, (rank + 1) * per))
        x = _RowsOfThisRank.apply(x, lo, hi, ps.get_tensor_model_parallel_group())
        s, b = s[lo:hi] - rank * per, b[lo:hi]
    return {"context": x, "context_mask": torch.stack([s, b])}


def _deepstack_hook(level: int):
    """Adds DeepStack feature `level` to a decoder layer's output at the image positions."""

    def hook(module, args, kwargs, output):
        features, where = kwargs.get("context"), kwargs.get("context_mask")
        if features is None:
            return output
        hidden, context = output
        hidden = hidden.index_put((where[0], where[1]), features[level].to(hidden.dtype),
                                  accumulate=True)
        return hidden, context

    return hook


def install_deepstack(decoder, levels: int) -> None:
    """Hooks on the first `levels` LLM layers, which must all be in this chunk."""
    present = {layer.layer_number - 1: layer for layer in decoder.layers}
    missing = [k for k in range(levels) if k not in present]
    if missing:
        raise ConfigError(f"Qwen3-VL's DeepStack needs LLM layers 0..{levels - 1} on the first "
                          f"pipeline stage, which holds {len(decoder.layers)}: raise "
                          "parallel.first_stage_layers or lower parallel.pipeline_parallel")
    for k in range(levels):
        present[k].register_forward_hook(_deepstack_hook(k), with_kwargs=True)


# --- the whole model -------------------------------------------------------------------------


class Qwen3VLModel(LanguageModelStages, MegatronModule):
    """One pipeline chunk of Qwen3-VL: [vision tower + DeepStack +] a slice of the LLM.

    `build_language_model(cfg.text, par, vp_stage, mrope_section=..., scatter_embeddings=False)`
    makes the LLM chunk (a GPTModel); `build_gpt` builds dense and MoE LLMs from their
    LLMConfig, so Qwen3-VL-MoE reuses this class as it is."""

    def __init__(self, cfg: Qwen3VLConfig, par: ParallelConfig, vp_stage: int | None = None,
                 build_language_model: Callable = build_gpt):
        lm = build_language_model(cfg.text, par, vp_stage, mrope_section=cfg.mrope_section,
                                  scatter_embeddings=False)
        lm.rotary_pos_emb = InterleavedMRoPE(cfg.text.kv_channels, cfg.text.rope_theta,
                                             cfg.mrope_section)
        super().__init__(config=lm.config)
        self.cfg = cfg
        self.pre_process, self.post_process = stage_flags(vp_stage)
        self.vp_stage = vp_stage
        self.language_model = lm
        self.vision_model = Qwen3VLVisionModel(cfg.vision, par) if self.pre_process else None
        if self.vision_model is not None:
            install_deepstack(lm.decoder, len(cfg.vision.deepstack_visual_indexes))
            if cfg.freeze_vision:
                for p in self.vision_model.parameters():
                    p.requires_grad_(False)
        self.share_embeddings_and_output_weights = lm.share_embeddings_and_output_weights

    def forward(self, input_ids, position_ids, attention_mask=None, pixel_values=None,
                image_grid_thw=None, labels=None, image_index=None, packed_seq_params=None):
        """`position_ids` [3, B, S] (`mrope_position_ids`); `image_index`: see
        `vlm.embed_with_images` (rows sharing images); `packed_seq_params`: a packed row."""
        decoder_input, block_kwargs = None, None
        if self.pre_process:
            images, deepstack = None, []
            if pixel_values is not None:
                images, deepstack = self.vision_model(pixel_values, image_grid_thw)
            decoder_input = embed_with_images(self.language_model, input_ids,
                                              self.cfg.image_token_id, images,
                                              image_index=image_index)
            if deepstack:
                block_kwargs = deepstack_block_kwargs(
                    input_ids, self.cfg.image_token_id, deepstack, image_index,
                    self.language_model.config.sequence_parallel)
        return self.language_model(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=attention_mask, decoder_input=decoder_input,
                                   labels=labels, packed_seq_params=packed_seq_params,
                                   extra_block_kwargs=block_kwargs)


__all__ = ["InterleavedMRoPE", "Qwen3VLModel", "Qwen3VLVisionModel", "build_qwen3_vl_chunks",
           "deepstack_block_kwargs", "install_deepstack", "interleaved_axes", "mrope_position_ids",
           "position_interpolation"]


def build_qwen3_vl_chunks(cfg: Qwen3VLConfig, par: ParallelConfig,
                          build_language_model: Callable = build_gpt) -> list[torch.nn.Module]:
    validate_qwen3_vl_layout(cfg, par)
    return build_chunks(lambda vp: Qwen3VLModel(cfg, par, vp, build_language_model), par)
