"""/generate request bodies from our prompts, and samples from SGLang's answers.

Image prompts: SGLang expands each image's placeholder into the image's tokens itself
(sglang/srt/multimodal/processors/base_processor.py), so it must receive text with one
placeholder per image plus the raw images, never our ids with the pads already expanded
(its InternVL processor refuses pre-tokenized ids with raw images; for Qwen2.5-VL it decodes
them back to text). The engine then checks that SGLang's prompt length (`meta_info.
prompt_tokens`) equals our ids', so a prompt the engine saw differently from the trainer is
an error, not a sample trained on with the wrong context.
"""
from __future__ import annotations

import base64
import io
import os
import re
from typing import Any

import numpy as np
import torch

from eureka_megatron.models.registry import FAMILIES, family_named
from eureka_megatron.rollout.engine import Prompt, Sample, SamplingParams, StaleWeightsError
from eureka_megatron.rollout.sglang.flags import ROUTED_EXPERTS_FLAG

# The VLM family of each HF model_type SGLang serves (for its image placeholders).
FAMILY_OF_MODEL_TYPE = {t: f.name for f in FAMILIES if f.sglang_image_placeholder for t in f.model_types}


class PromptMismatchError(ValueError):
    """SGLang's view of a prompt (its token count) differs from the trainer's ids."""


class RequestAborted(RuntimeError):
    """SGLang aborted the request (pause_generation of a weight sync, or an abort call)."""


def image_item(img: Any) -> str:
    """SGLang image_data item: paths / URLs / data URIs pass through (the server must be able to
    read the path); bytes and PIL images become base64 data."""
    if isinstance(img, os.PathLike):
        return os.fspath(img)
    if isinstance(img, str):
        return img
    if isinstance(img, (bytes, bytearray)):
        return base64.b64encode(bytes(img)).decode("ascii")
    if hasattr(img, "save"):  # PIL.Image
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    raise TypeError(f"unsupported image type {type(img).__name__} (path, URL, bytes or PIL)")


def sglang_prompt_text(text: str, family: str) -> tuple[str, int]:
    """`text` with each expanded image block (start, pads, end) replaced by SGLang's
    one-placeholder form for `family`; returns the text and the number of images found."""
    fam = family_named(family)
    chat = fam.chat
    block = re.compile(re.escape(chat.image_start) + "(?:" + re.escape(chat.image_pad) + ")+"
                       + re.escape(chat.image_end))
    return block.subn(lambda _: fam.sglang_image_placeholder, text)


def generate_bodies(prompt: Prompt, index: int, n: int, sp: SamplingParams, *,
                    family: str | None, seeded: bool) -> list[dict]:
    """The /generate requests for prompt `index`'s n samples (their outputs, in order, are the n
    samples).

    seeded (the server honours sampling_seed): a batch of n copies, copy j seeded
    `seed + index * n + j`, so each sample's seed is independent of how prompts are split over
    engines; otherwise one request with SGLang's `n` (samples share the prompt's prefill). A
    tiled prompt (`Prompt.max_tiles`) carries it as `image_max_dynamic_patch`, which SGLang reads
    from single requests only: its n samples go as n single requests (the server's prefix cache
    still shares their prefill)."""
    params: dict[str, Any] = {
        "max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature,
        "top_p": sp.top_p, "top_k": sp.top_k if sp.top_k > 0 else -1,
        "skip_special_tokens": True, "no_stop_trim": True}  # stop strings stay in the text
    if sp.stop:
        params["stop"] = list(sp.stop)
    if sp.stop_token_ids:
        params["stop_token_ids"] = [int(t) for t in sp.stop_token_ids]
    images = [image_item(im) for im in prompt.images]
    if images:
        known = sorted(set(FAMILY_OF_MODEL_TYPE.values()))
        if family not in known:
            raise ValueError(f"prompt {index} has images, but the engine does not know the model "
                             f"family ({family!r}; one of {known}) to write SGLang's image "
                             "placeholders")
        if prompt.text is None:
            raise ValueError(f"prompt {index} has images but no text: SGLang expands image "
                             "placeholders itself and needs the prompt text")
        text, found = sglang_prompt_text(prompt.text, family)
        if found != len(images):
            raise ValueError(f"prompt {index}: its text has {found} image blocks for "
                             f"{len(images)} images")
        key, value = "text", text
    elif prompt.input_ids:
        key, value = "input_ids", [int(t) for t in prompt.input_ids]
    elif prompt.text is not None:
        key, value = "text", prompt.text
    else:
        raise ValueError(f"prompt {index} has neither input_ids nor text")
    body: dict[str, Any] = {"return_logprob": True}
    if sp.return_routed_experts:
        body["return_routed_experts"] = True
    seeds = seeded and sp.seed is not None
    # each sample's own params: seeded `seed + index * n + j`, whatever the prompts' split
    per_sample = [dict(params, sampling_seed=sp.seed + index * n + j) if seeds else params
                  for j in range(n)]
    if images and prompt.max_tiles is not None:
        body["image_max_dynamic_patch"] = int(prompt.max_tiles)
        return [dict(body, **{key: value, "image_data": images, "sampling_params": p})
                for p in per_sample]
    if n == 1:
        body.update({key: value, "sampling_params": per_sample[0]})
        if images:
            body["image_data"] = images  # a single request: its own images, flat
    elif seeds:  # a batch of n copies, each with its own seed (one seed would repeat one sample)
        body.update({key: [value] * n, "sampling_params": per_sample})
        if images:
            body["image_data"] = [images] * n  # one list per batch entry
    else:
        body.update({key: value, "sampling_params": dict(params, n=n)})
        if images:
            body["image_data"] = [images]  # n > 1 makes a batch of one: one list per prompt
    return [body]


def parse_sample(out: dict, prompt_index: int, version: int, expected_prompt_tokens: int | None,
                 url: str, routed_experts: bool = False) -> Sample:
    """A Sample from one SGLang output (entries of meta_info.output_token_logprobs are
    (logprob, token_id, text|None)); raises on aborts, other weights and prompt mismatches.
    `routed_experts`: the request asked for its routing (meta_info.routed_experts)."""
    meta = out.get("meta_info") or {}
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind == "abort":  # e.g. pause_generation of a weight sync
        message = reason.get("message") if isinstance(reason, dict) else None
        raise RequestAborted(f"{url}: request aborted: {message}")
    if kind not in ("stop", "length"):
        raise RuntimeError(f"{url}: unexpected finish_reason {reason!r}")
    served = meta.get("weight_version")
    if served is not None and str(served) != str(version):
        raise StaleWeightsError(f"{url}: server generated with weight version {served!r}, "
                                f"engine expects {version}")
    counted = meta.get("prompt_tokens")
    if expected_prompt_tokens is not None and counted is not None \
            and int(counted) != expected_prompt_tokens:
        raise PromptMismatchError(
            f"{url}: prompt {prompt_index}: SGLang counted {counted} prompt tokens, the trainer's "
            f"ids have {expected_prompt_tokens}; the engine would sample from a different prompt "
            "than the one trained on (image sizes: check data.min_pixels / max_pixels or the "
            "InternVL tiling against the server's processor config)")
    entries = meta.get("output_token_logprobs")
    if entries is None:
        raise RuntimeError(f"{url}: answer has no meta_info.output_token_logprobs")
    routing = None
    if routed_experts:
        routing = parse_routed_experts(meta, len(entries), url)
    return Sample(prompt_index, [int(e[1]) for e in entries], out.get("text") or "",
                  [float(e[0]) for e in entries], kind, version, routing)


def parse_routed_experts(meta: dict, completion_tokens: int, url: str) -> torch.Tensor:
    """meta_info.routed_experts: base64 of int32 expert ids for every token the server fed
    (prompt + completion - 1), layers x k per token, as SGLang's tokenizer manager encodes them.
    Returned as [tokens, layers * k]: the trainer splits the layers by its model's k."""
    raw = meta.get("routed_experts")
    if raw is None:
        raise RuntimeError(f"{url}: the answer has no meta_info.routed_experts; start the server "
                           f"with {ROUTED_EXPERTS_FLAG} (rollout.routing_replay)")
    ids = torch.from_numpy(np.frombuffer(base64.b64decode(raw), dtype=np.int32).copy())
    tokens = int(meta.get("prompt_tokens", 0)) + completion_tokens - 1
    if tokens < 1 or ids.numel() % tokens:
        raise RuntimeError(f"{url}: meta_info.routed_experts holds {ids.numel()} expert ids, not "
                           f"a whole number per each of the {tokens} fed tokens")
    return ids.view(tokens, -1)
