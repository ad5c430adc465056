"""Synthetic visual-math data: determinism, content-disjoint splits, balance, answers checked
against the pixels (not against the generator's own bookkeeping), reward compatibility, and
the JSONL round trip."""
from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from eureka_megatron.data.synthetic import (
    SEGMENTS,
    TASKS,
    Example,
    chance_accuracy,
    make_example,
    split_of,
    synthetic_dataset,
    write_jsonl,
)
from eureka_megatron.rewards import accuracy_reward


def ans(text: str) -> str:
    return f"<think>looking at the image</think><answer>{text}</answer>"


def fingerprint(ex: Example) -> tuple:
    return (ex.id, ex.task, ex.question, ex.answer, ex.image.tobytes())


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask by iterative flood fill; lists of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def ink(ex: Example) -> np.ndarray:
    return np.asarray(ex.image).max(axis=2) > 0


def test_determinism_and_seed_sensitivity():
    a = synthetic_dataset(24, "train", seed=3)
    b = synthetic_dataset(24, "train", seed=3)
    c = synthetic_dataset(24, "train", seed=4)
    assert [fingerprint(x) for x in a] == [fingerprint(x) for x in b]
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in c]
    # a longer dataset extends a shorter one: n does not reshuffle earlier examples
    longer = synthetic_dataset(40, "train", seed=3)
    assert [fingerprint(x) for x in longer[:24]] == [fingerprint(x) for x in a]
    # heldout is a different stream
    h = synthetic_dataset(24, "heldout", seed=3)
    assert [x.image.tobytes() for x in h] != [x.image.tobytes() for x in a]


def test_image_shape_and_sizes():
    for size in (56, 84):
        for ex in synthetic_dataset(len(TASKS), seed=0, image_size=size):
            assert ex.image.mode == "RGB" and ex.image.size == (size, size)
            assert ink(ex).any()


def test_splits_disjoint_by_content():
    train = synthetic_dataset(400, "train", seed=0)
    held = synthetic_dataset(200, "heldout", seed=0)
    assert all(split_of(x.key) == "train" for x in train)
    assert all(split_of(x.key) == "heldout" for x in held)
    assert not {x.key for x in train} & {x.key for x in held}
    assert not {(x.question, x.image.tobytes()) for x in train} & {
        (x.question, x.image.tobytes()) for x in held}


def test_tasks_balanced_round_robin():
    data = synthetic_dataset(4 * len(TASKS) + 1, seed=1)
    assert [x.task for x in data[: len(TASKS)]] == list(TASKS)
    counts = Counter(x.task for x in data)
    assert max(counts.values()) - min(counts.values()) <= 1
    sub = synthetic_dataset(6, seed=1, tasks=["tallest_bar", "count_circles"])
    assert [x.task for x in sub] == ["tallest_bar", "count_circles"] * 3


def test_answers_cover_their_range():
    data = synthetic_dataset(400, seed=2)
    by_task = {t: Counter(x.answer for x in data if x.task == t) for t in TASKS}
    assert set(by_task["count_circles"]) == {"1", "2", "3", "4", "5"}
    assert set(by_task["read_digit"]) == {str(d) for d in range(10)}
    assert set(by_task["tallest_bar"]) == {"A", "B", "C"}
    assert all(0 <= int(a) <= 18 for a in by_task["sum_digits"])


def test_count_matches_connected_components():
    for ex in synthetic_dataset(60, seed=5, tasks=["count_circles"]):
        assert len(components(ink(ex))) == int(ex.answer)


def test_tallest_bar_measured_from_pixels():
    for ex in synthetic_dataset(60, seed=6, tasks=["tallest_bar"]):
        assert ex.choices == ["A", "B", "C"]
        bars = sorted(components(ink(ex)), key=lambda px: px[:, 1].min())
        assert len(bars) == 3
        heights = [px[:, 0].max() - px[:, 0].min() + 1 for px in bars]
        assert "ABC"[int(np.argmax(heights))] == ex.answer
        assert sorted(heights)[-1] > sorted(heights)[-2]


def read_seven_segment(mask: np.ndarray) -> int:
    """Decode one 7-segment digit from its ink: probe the middle of each segment's box."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    if x1 - x0 < 6:  # a "1": only the right segments, the box collapses to the stroke
        return 1
    cx, q1, q3, my = (x0 + x1) // 2, y0 + (y1 - y0) // 4, y0 + 3 * (y1 - y0) // 4, (y0 + y1) // 2
    probes = {"a": (y0, cx), "d": (y1, cx), "g": (my, cx), "f": (q1, x0), "b": (q1, x1),
              "e": (q3, x0), "c": (q3, x1)}
    lit = "".join(s for s in "abcdefg" if mask[probes[s]])
    matches = [d for d, segs in SEGMENTS.items() if set(segs) == set(lit)]
    assert len(matches) == 1, lit
    return matches[0]


def test_digits_read_back_from_pixels():
    for ex in synthetic_dataset(40, seed=7, tasks=["read_digit"]):
        assert read_seven_segment(ink(ex)) == int(ex.answer)
    for ex in synthetic_dataset(40, seed=7, tasks=["sum_digits"]):
        m = ink(ex)
        half = m.shape[1] // 2
        left, right = m.copy(), m.copy()
        left[:, half:] = False
        right[:, :half] = False
        assert read_seven_segment(left) + read_seven_segment(right) == int(ex.answer)


def test_accuracy_reward_scores_gold_and_wrong():
    assert accuracy_reward("<think>..</think><answer>3</answer>", "3") == 1.0
    for ex in synthetic_dataset(2 * len(TASKS), seed=8):
        assert accuracy_reward(ans(ex.answer), ex.answer) == 1.0
        if ex.choices:
            wrong = next(c for c in ex.choices if c != ex.answer)
        else:
            wrong = str(int(ex.answer) + 1)
        assert accuracy_reward(ans(wrong), ex.answer) == 0.0


def test_chance_accuracy():
    assert chance_accuracy("count_circles") == pytest.approx(0.2)
    assert chance_accuracy("read_digit") == pytest.approx(0.1)
    assert chance_accuracy("tallest_bar") == pytest.approx(1 / 3)
    assert chance_accuracy("sum_digits") == pytest.approx(0.1)
    # the majority answer of a large sample is near the stated chance level
    data = synthetic_dataset(800, seed=9, tasks=["tallest_bar", "count_circles"])
    for task in ("tallest_bar", "count_circles"):
        answers = Counter(x.answer for x in data if x.task == task)
        assert max(answers.values()) / sum(answers.values()) < chance_accuracy(task) + 0.08
    with pytest.raises(ValueError, match="unknown task"):
        chance_accuracy("nope")


def test_write_jsonl_round_trip(tmp_path):
    data = synthetic_dataset(8, "heldout", seed=10)
    path = write_jsonl(data, tmp_path / "out")
    assert path == tmp_path / "out" / "data.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(data)
    for row, ex in zip(rows, data):
        assert set(row) == {"id", "images", "question", "answer", "task"}
        assert (row["id"], row["question"], row["answer"], row["task"]) == (ex.id, ex.question,
                                                                     ex.answer, ex.task)
        assert row["images"] == [f"images/{ex.id}.png"]
        with Image.open(path.parent / row["images"][0]) as img:
            assert img.convert("RGB").tobytes() == ex.image.tobytes()
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.jsonl", "images"]


def test_make_example_direct():
    ex = make_example("count_circles", random.Random(0))
    assert ex.task == "count_circles" and ex.answer in {"1", "2", "3", "4", "5"}
    assert ex.key.startswith("count_circles|")


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "positive"),
    ({"n": -3}, "positive"),
    ({"n": 4, "split": "test"}, "unknown split"),
    ({"n": 4, "tasks": ["count_circles", "bogus"]}, "unknown task"),
    ({"n": 4, "tasks": []}, "at least one"),
    ({"n": 4, "image_size": 50}, "multiple of 28"),
    ({"n": 4, "image_size": 28}, ">= 56"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_dataset(**kwargs)


def test_make_example_bad_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_example("bogus", random.Random(0))
