"""Prompt text in the ChatML layout both families use, with image placeholders expanded.

The prompt is rendered here (not with the tokenizer's chat template) so the trainer controls
exactly how many image tokens each image gets -- the count must equal what the vision tower
emits -- and so the same code serves checkpoints whose templates differ or are missing.

Layout (system turn only when a system prompt is given):
    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{images}{question}<|im_end|>\\n
    <|im_start|>assistant\\n
One image is `image_start + image_pad * n + image_end` (Qwen2.5-VL: <|vision_start|>
<|image_pad|>... <|vision_end|>; InternVL: <img><IMG_CONTEXT>...</img>). Images go in front of
the question, InternVL followed by "\\n" (its "<image>\\n{question}" convention); a question with
literal "<image>" placeholders gets its images there instead, one per placeholder. Each family's
markup (`ChatTokens`) lives in its package, `models/<family>/__init__.py`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eureka_megatron.models.family import ChatTokens

__all__ = ["R1_SYSTEM_PROMPT", "R1_ZERO_SYSTEM_PROMPT",
           "IMAGE_PLACEHOLDER",
           "render_prompt", "jinja_chat_template"]

IMAGE_PLACEHOLDER = "<image>"

# Our wording, in the spirit of MM-Eureka's SYSTEM_PROMPT_7B (R1-style think-then-answer); the
# format reward checks for exactly these tags.
R1_SYSTEM_PROMPT = (
    "You are a careful assistant who solves problems about images. First work through the "
    "problem step by step inside <think> </think> tags: look at the image, note what matters, "
    "and reason to a result. Then give only the final answer inside <answer> </answer> tags, "
    "as a number, expression or option letter, with math in LaTeX, for example "
    "<think> The picture shows 1 apple and 1 more apple, so there are 1+1=2. </think>"
    "<answer>$2$</answer>."
)


# For pretrained (not instruction-tuned) bases, MM-Eureka-Zero's setting: think, then answer with
# the final result in \boxed{} (the Zero reward reads the last one). Our wording.
R1_ZERO_SYSTEM_PROMPT = (
    "The user asks a question about an image and you answer it. Think it through first: write "
    "your reasoning inside <think> </think> tags, then write the answer inside <answer> </answer> "
    "tags with the final result in \\boxed{}, for example <think> reasoning here </think>"
    "<answer> The result is \\boxed{2}. </answer>."
)


def render_prompt(chat: ChatTokens, question: str, image_tokens: list[int],
                  system_prompt: str | None) -> str:
    """The generation prompt for one question with len(image_tokens) images."""
    if any(n < 1 for n in image_tokens):
        raise ValueError(f"every image needs at least one token, got {image_tokens}")
    blocks = [chat.image_start + chat.image_pad * n + chat.image_end for n in image_tokens]
    marks = question.count(IMAGE_PLACEHOLDER)
    if marks:
        if marks != len(blocks):
            raise ValueError(f"question has {marks} {IMAGE_PLACEHOLDER} placeholders for "
                             f"{len(blocks)} images")
        pieces = question.split(IMAGE_PLACEHOLDER)
        user = pieces[0] + "".join(b + rest for b, rest in zip(blocks, pieces[1:]))
    else:
        user = "".join(b + chat.image_sep for b in blocks) + question
    system = "" if system_prompt is None else (
        f"{chat.im_start}system\n{system_prompt}{chat.im_end}\n")
    return f"{system}{chat.im_start}user\n{user}{chat.im_end}\n{chat.im_start}assistant\n"


def jinja_chat_template(chat: ChatTokens) -> str:
    """`render_prompt`'s layout as a transformers chat template, for checkpoints we write (the CPU
    demo's): images of a turn as one `image_start + image_pad + image_end` each, in front of its
    text (the processor expands the pad), a system turn only when the messages hold one."""
    image = chat.image_start + chat.image_pad + chat.image_end + chat.image_sep
    return (
        "{% for m in messages %}" + chat.im_start + "{{ m['role'] }}\n"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for c in m['content'] if c['type'] == 'image' %}" + image + "{% endfor %}"
        "{% for c in m['content'] if c['type'] == 'text' %}{{ c['text'] }}{% endfor %}"
        "{% endif %}" + chat.im_end + "\n{% endfor %}"
        "{% if add_generation_prompt %}" + chat.im_start + "assistant\n{% endif %}")
