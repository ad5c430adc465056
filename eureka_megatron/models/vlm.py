"""What every VLM here does between its vision tower and its LLM: image embeddings replace the
token embeddings at the image-token positions."""
from __future__ import annotations

import torch


def embed_with_images(language_model, input_ids: torch.Tensor, image_token_id: int,
                      images: torch.Tensor | None, source: str = "the images") -> torch.Tensor:
    """The LLM's token embeddings [S, B, H] with `images` [N, H] written, in order, over the N
    positions of `image_token_id`; a count mismatch is an error, not a silent misalignment."""
    emb = language_model.embedding(input_ids=input_ids, position_ids=None)
    if images is None:
        return emb
    slots = input_ids == image_token_id
    if int(slots.sum()) != images.shape[0]:
        raise ValueError(f"{int(slots.sum())} image tokens (id {image_token_id}) in input_ids "
                         f"but {source} give {images.shape[0]} embeddings")
    bsh = emb.transpose(0, 1).masked_scatter(slots[..., None], images.to(emb.dtype))
    return bsh.transpose(0, 1).contiguous()
