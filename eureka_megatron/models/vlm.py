"""What the VLMs here share: the vision towers' layer spec, and the step between tower and LLM
(image embeddings replace the token embeddings at the image-token positions)."""
from __future__ import annotations

import torch


def embed_with_images(language_model, input_ids: torch.Tensor, image_token_id: int,
                      images: torch.Tensor | None, source: str = "the images",
                      image_index: torch.Tensor | None = None) -> torch.Tensor:
    """The LLM's token embeddings [S, B, H] with `images` [N, H] written, in order, over the N
    positions of `image_token_id`; a count mismatch is an error, not a silent misalignment.

    `image_index` (optional): rows share images (a GRPO group's n responses), so the tower ran
    once per distinct image and the slots are filled with `images[image_index]` in order. The
    gather is `index_select`, whose backward (`index_add_`) sums the n copies' gradients in a fixed
    order on CPU; plain indexing's backward adds them with racing atomics when torch has more than
    one thread, so the same seed gave a different run.

    Under sequence parallelism the result is this TP rank's slice of the sequence: the embedding
    kept the whole sequence (`build_gpt(scatter_embeddings=False)`) for the merge."""
    emb = language_model.embedding(input_ids=input_ids, position_ids=None)
    if images is not None:
        emb = _merged(emb, input_ids, image_token_id, images, source, image_index)
    if language_model.config.sequence_parallel:  # built with scatter_embeddings=False
        from megatron.core.tensor_parallel import scatter_to_sequence_parallel_region
        emb = scatter_to_sequence_parallel_region(emb).clone()  # a view pins the whole
    return emb


def _merged(emb, input_ids, image_token_id, images, source, image_index):
    """`emb` with the image embeddings over the image-token slots (see `embed_with_images`)."""
    if image_index is not None:
        images = torch.index_select(images, 0, image_index.to(images.device))
    slots = input_ids == image_token_id
    if int(slots.sum()) != images.shape[0]:
        raise ValueError(f"{int(slots.sum())} image tokens (id {image_token_id}) in input_ids "
                         f"but {source} give {images.shape[0]} embeddings")
    bsh = emb.transpose(0, 1).masked_scatter(slots[..., None], images.to(emb.dtype))
    return bsh.transpose(0, 1).contiguous()


def vision_layer_spec(layer=None, attn_mask_type=None, linear_qkv=None, qk_norm=None):
    """megatron's local, non-causal layer for a vision tower: torch norms (RMSNorm or LayerNorm
    from the config), column/row-parallel attention and MLP, checkpoint keys as with Transformer
    Engine's fused norm+linear layers. Defaults: TransformerLayer, padding mask, qkv with bias,
    no qk-norm."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=layer or TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type or AttnMaskType.padding},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv or ColumnParallelLinear,
                    core_attention=DotProductAttention, linear_proj=RowParallelLinear,
                    q_layernorm=qk_norm, k_layernorm=qk_norm)),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


class LanguageModelStages:
    """What megatron's pipeline schedule asks a VLM, answered by its language model (the vision
    tower sits inside the first stage). Mixed in before MegatronModule."""

    def set_input_tensor(self, tensor) -> None:
        self.language_model.set_input_tensor(tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()
