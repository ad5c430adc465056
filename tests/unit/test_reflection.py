"""Reflection metrics: phrase matching and each batch metric against values worked out by hand."""
from __future__ import annotations

import math

import pytest

from eureka_megatron.rewards import DEFAULT_REFLECTION_PHRASES, is_reflective, reflection_metrics


@pytest.mark.parametrize("text,expected", [
    ("Wait, the angle is 30 degrees.", True),
    ("WAIT. That is wrong.", True),
    ("so x = 2... wait", True),
    ("Let me re-check the area.", True),
    ("let me recheck", True),
    ("Let me  double-check\nthe sum", True),  # any whitespace between the words
    ("Upon closer inspection, the triangle is isosceles.", True),
    ("On second thought, it is 5.", True),
    ("I made a mistake above.", True),
    ("Let me verify: 2 + 2 = 4.", True),
    ("Looking again at the figure, ...", True),
    ("awaiting the result", False),  # "wait" inside a word
    ("the waiter brought", False),
    ("await", False),
    ("The triangle is right-angled, so the answer is 5.", False),
    ("", False),
])
def test_is_reflective_default_phrases(text, expected):
    assert is_reflective(text) is expected


def test_default_phrases_are_lowercase_and_unique():
    assert len(DEFAULT_REFLECTION_PHRASES) >= 10
    assert len(set(DEFAULT_REFLECTION_PHRASES)) == len(DEFAULT_REFLECTION_PHRASES)
    assert all(p == p.lower().strip() for p in DEFAULT_REFLECTION_PHRASES)


def test_custom_phrases():
    assert is_reflective("Hmm, interesting.", phrases=("hmm",))
    assert not is_reflective("Wait, no.", phrases=("hmm",))
    assert is_reflective("x+y done", phrases=("x+y",))  # regex characters are literal
    assert not is_reflective("xxy done", phrases=("x+y",))
    assert not is_reflective("anything", phrases=())


# A batch worked out by hand, max_length = 100.
RESPONSES = [
    "Wait, I need to redo this.",   # reflective, correct, length 100 (clipped)
    "The answer is 4.",             # plain,      wrong,   length 20
    "Let me verify the result.",    # reflective, wrong,   length 60
    "awaiting nothing; it is 3.",   # plain,      correct, length 40
    "It is 7.",                     # plain,      correct, length 120 (clipped)
]
ACCURACY = [1.0, 0.0, 0.0, 1.0, 1.0]
LENGTHS = [100, 20, 60, 40, 120]


def test_metrics_hand_computed():
    m = reflection_metrics(RESPONSES, ACCURACY, LENGTHS, max_length=100)
    assert set(m) == {
        "reflection/rate", "reflection/count", "response_length/mean", "response_length/max",
        "response_length/clipped_rate", "accuracy/reflective", "accuracy/non_reflective",
    }
    assert m["reflection/count"] == 2
    assert m["reflection/rate"] == pytest.approx(2 / 5)
    assert m["response_length/mean"] == pytest.approx(340 / 5)
    assert m["response_length/max"] == 120
    assert m["response_length/clipped_rate"] == pytest.approx(2 / 5)  # 100 and 120 hit 100
    assert m["accuracy/reflective"] == pytest.approx(1 / 2)
    assert m["accuracy/non_reflective"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in m.values())


def test_metrics_custom_phrases():
    m = reflection_metrics(RESPONSES, ACCURACY, LENGTHS, max_length=1000, phrases=("answer",))
    assert m["reflection/count"] == 1  # only "The answer is 4."
    assert m["accuracy/reflective"] == 0.0
    assert m["accuracy/non_reflective"] == pytest.approx(3 / 4)
    assert m["response_length/clipped_rate"] == 0.0


def test_empty_subsets_are_nan():
    all_reflective = reflection_metrics(["wait", "Wait!"], [1.0, 0.0], [3, 4], max_length=10)
    assert all_reflective["accuracy/reflective"] == pytest.approx(0.5)
    assert math.isnan(all_reflective["accuracy/non_reflective"])
    none_reflective = reflection_metrics(["ok"], [1.0], [3], max_length=10)
    assert math.isnan(none_reflective["accuracy/reflective"])
    assert none_reflective["accuracy/non_reflective"] == 1.0
    assert none_reflective["reflection/rate"] == 0.0


@pytest.mark.parametrize("accuracy,lengths,numbers", [
    ([1.0], [3, 4], ("2 responses", "1 accuracy", "2 lengths")),
    ([1.0, 0.0], [3], ("2 responses", "2 accuracy", "1 lengths")),
])
def test_length_mismatch_names_the_lengths(accuracy, lengths, numbers):
    with pytest.raises(ValueError) as err:
        reflection_metrics(["a", "b"], accuracy, lengths, max_length=10)
    for part in numbers:
        assert part in str(err.value)


def test_empty_batch_and_bad_max_length():
    with pytest.raises(ValueError, match="empty"):
        reflection_metrics([], [], [], max_length=10)
    with pytest.raises(ValueError, match="max_length"):
        reflection_metrics(["a"], [1.0], [1], max_length=0)
