"""Rule-based rewards: exact 0/1 accuracy and format scores, plus reflection metrics.

The rewards are the only training signal, so every score must mean what it says. Fixed
against MM-Eureka's reward code: (1) a gold answer math-verify cannot parse gave every
response 1.0 — here word golds are compared as normalised text and nothing is free;
(2) the answer block was matched without DOTALL, so multi-line answers fell back to
grading a number anywhere in the reasoning — here the last answer block (any lines), else
the last \\boxed{}, else 0; (3) multiple choice tested letters as substrings, so
"The answer is C" contained "a" and failed — here the chosen letter is read from the
answer's form. `rule_based_scores` is the reward-function seam the worker pool imports;
`zero_scores` is MM-Eureka-Zero's (pretrained base models); `RewardPool` runs any such functions
in worker processes with per-response timeouts.
"""
from __future__ import annotations

from eureka_megatron.rewards.accuracy import accuracy_reward, last_boxed
from eureka_megatron.rewards.format import format_reward
from eureka_megatron.rewards.pool import RewardPool, RewardResult
from eureka_megatron.rewards.reflection import (
    DEFAULT_REFLECTION_PHRASES,
    is_reflective,
    reflection_metrics,
)

__all__ = [
    "DEFAULT_REFLECTION_PHRASES",
    "RewardPool",
    "RewardResult",
    "accuracy_reward",
    "format_reward",
    "is_reflective",
    "reflection_metrics",
    "rule_based_scores",
    "zero_scores",
]

ZERO_MIN_THINK_CHARS = 300  # MM-Eureka-Zero: a shorter think part scores no format reward


def rule_based_scores(response: str, answer: str, meta: dict | None = None) -> dict[str, float]:
    """Named 0/1 scores for one response; meta is accepted for the seam and unused."""
    return {"accuracy": accuracy_reward(response, answer), "format": format_reward(response)}


def zero_scores(response: str, answer: str, meta: dict | None = None) -> dict[str, float]:
    """MM-Eureka-Zero's reward (its pretrain reward function): accuracy of the last \\boxed{}
    of the whole response; format as `format_reward`, 0 when the think part is under 300
    characters. MM-Eureka weighs both 1.0."""
    boxed = last_boxed(response) if isinstance(response, str) else None
    accuracy = 0.0 if boxed is None else accuracy_reward("\\boxed{" + boxed + "}", answer)
    return {"accuracy": accuracy, "format": format_reward(response, ZERO_MIN_THINK_CHARS)}
