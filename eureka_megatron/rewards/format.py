"""Format reward: the response is exactly one think block followed by one answer block."""
from __future__ import annotations

import re

_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# Anchored at both ends (MM-Eureka's instruct regex allowed text before <think> and
# after </answer>, so a model could pad around the blocks and still score).
_LAYOUT = re.compile(r"<think>(.*)</think>\s*<answer>(.*)</answer>", re.DOTALL)


def format_reward(response: str, min_think_chars: int = 0) -> float:
    """1.0 for `<think>…</think> <answer>…</answer>` (each tag once, both non-blank, the think
    part at least `min_think_chars` long), else 0.0."""
    if not isinstance(response, str):
        return 0.0
    text = response.strip()
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    m = _LAYOUT.fullmatch(text)
    if m is None or not m.group(1).strip() or not m.group(2).strip():
        return 0.0
    return 1.0 if len(m.group(1)) >= min_think_chars else 0.0
