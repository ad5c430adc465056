"""Reflection ("visual aha moment") metrics: how often responses re-check themselves, and
whether the reflective ones are more accurate, logged per batch next to response lengths."""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

from eureka_megatron.stats import mean

DEFAULT_REFLECTION_PHRASES: tuple[str, ...] = (
    "wait",
    "hold on",
    "let me re-check",
    "let me recheck",
    "let me double-check",
    "let me double check",
    "let me verify",
    "let me reconsider",
    "check again",
    "re-examine",
    "looking again",
    "upon closer inspection",
    "on second thought",
    "i made a mistake",
)


@functools.lru_cache(maxsize=32)
def _pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    # Whole words only ("wait" must not hit "awaiting"), any whitespace between words.
    alternatives = [
        r"\s+".join(re.escape(word) for word in phrase.split())
        for phrase in phrases
        if phrase.strip()
    ]
    if not alternatives:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def is_reflective(response: str, phrases: Iterable[str] = DEFAULT_REFLECTION_PHRASES) -> bool:
    """True if the response contains any phrase (case-insensitive, whole words)."""
    return _pattern(tuple(phrases)).search(response) is not None


def reflection_metrics(
    responses: Sequence[str],
    accuracy: Sequence[float],
    lengths: Sequence[int],
    max_length: int,
    phrases: Iterable[str] = DEFAULT_REFLECTION_PHRASES,
) -> dict[str, float]:
    """Batch metrics; accuracy of an empty subset is NaN (absent, not zero)."""
    n = len(responses)
    if len(accuracy) != n or len(lengths) != n:
        raise ValueError(
            f"reflection_metrics: lengths differ: {n} responses, "
            f"{len(accuracy)} accuracy values, {len(lengths)} lengths"
        )
    if n == 0:
        raise ValueError("reflection_metrics: empty batch")
    if max_length <= 0:
        raise ValueError(f"reflection_metrics: max_length must be positive, got {max_length}")
    phrases = tuple(phrases)
    flags = [is_reflective(r, phrases) for r in responses]
    reflective = [float(a) for a, f in zip(accuracy, flags) if f]
    plain = [float(a) for a, f in zip(accuracy, flags) if not f]
    return {
        "reflection/rate": len(reflective) / n,
        "reflection/count": float(len(reflective)),
        "response_length/mean": sum(lengths) / n,
        "response_length/max": float(max(lengths)),
        "response_length/clipped_rate": sum(1 for x in lengths if x >= max_length) / n,
        "accuracy/reflective": mean(reflective),
        "accuracy/non_reflective": mean(plain),
    }
