"""The embedded synthetic visual-math dataset: the CPU demo's default data.

Small rendered images (56x56 by default: 4x4 patches of 14 px, 2x2 merged) with questions
whose answers the rule-based rewards verify exactly. Everything is drawn with PIL primitives
(shapes, bars, a hand-made 7-segment font), so nothing is downloaded and every pixel is a
pure function of the seed. Objects sit inside 14-px patch cells where possible: the CPU
feasibility trial found a tiny vision tower learns patch-aligned objects, not straddling ones.

Splits: every example has a content key (task + answer + all generating parameters); a hash
of that key assigns it to "train" or "heldout", so the splits are disjoint by content for
every seed and size, and each split also draws from its own RNG stream.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from eureka_megatron.atomic import write_text_atomic

__all__ = [
    "SPLITS",
    "TASKS",
    "Example",
    "chance_accuracy",
    "content_key",
    "make_example",
    "split_of",
    "synthetic_dataset",
    "write_jsonl",
]

TASKS: tuple[str, ...] = ("count_circles", "read_digit", "tallest_bar", "sum_digits")
SPLITS: tuple[str, ...] = ("train", "heldout")
CELL = 14  # the vision patch size: objects are kept inside one cell where the task allows
HELDOUT_BUCKETS = 4  # 1 of 4 hash buckets is held out (~25% of the parameter space)
MAX_COUNT = 5
BAR_LETTERS = ("A", "B", "C")

# Bright, well separated colours: every channel-max >= 160 so "non-black" is unambiguous.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64), (64, 255, 64), (80, 128, 255), (255, 255, 64),
    (255, 64, 255), (64, 255, 255), (255, 160, 32), (240, 240, 240),
)

# Segments a..g (top, top-right, bottom-right, bottom, bottom-left, top-left, middle).
SEGMENTS: dict[int, str] = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}

# Accuracy of the best image-blind constant answer: the floor the demo must rise above.
_CHANCE: dict[str, float] = {
    "count_circles": 1.0 / MAX_COUNT,   # uniform 1..5
    "read_digit": 1.0 / 10,             # uniform 0..9
    "tallest_bar": 1.0 / 3,             # uniform over A, B, C
    "sum_digits": 10.0 / 100,           # two uniform digits: P(sum == 9) = 10/100 is the mode
}


@dataclass
class Example:
    """One image + question + verifiable answer; `key` is the content key used for splits."""

    id: str
    task: str
    image: Image.Image
    question: str
    answer: str
    choices: list[str] | None = None
    key: str = field(default="", repr=False)


def chance_accuracy(task: str) -> float:
    """Best accuracy achievable without looking at the image (majority answer's probability)."""
    _check_task(task)
    return _CHANCE[task]


def content_key(task: str, answer: str, params: object) -> str:
    """Canonical text of everything that generated an example: equal keys = equal images."""
    return f"{task}|{answer}|{json.dumps(params, sort_keys=True, separators=(',', ':'))}"


def split_of(key: str) -> str:
    """The split a content key belongs to, by hash: a fixed partition of the parameter space."""
    bucket = hashlib.sha256(key.encode("utf-8")).digest()[0] % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "train"


def make_example(task: str, rng: random.Random, image_size: int = 56) -> Example:
    """Draw one example of `task` from `rng` (its split is `split_of(example.key)`)."""
    _check_task(task)
    _check_size(image_size)
    image, question, answer, choices, params = _GENERATORS[task](rng, image_size)
    key = content_key(task, answer, {"size": image_size, **params})
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
    return Example(id=f"{task}-{digest}", task=task, image=image, question=question,
                   answer=answer, choices=choices, key=key)


def synthetic_dataset(n: int, split: str = "train", seed: int = 0,
                      tasks: Sequence[str] | None = None, image_size: int = 56) -> list[Example]:
    """`n` examples of `split`, tasks round-robin, deterministic in all arguments.

    Each (split, seed, task, size) has its own RNG stream; draws whose content key hashes to
    the other split are rejected, so train and held-out never share an image+question.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    task_list = list(TASKS if tasks is None else tasks)
    if not task_list:
        raise ValueError("tasks must name at least one task")
    for task in task_list:
        _check_task(task)
    _check_size(image_size)

    # str seeds are hashed with sha512 by random.Random: stable across processes.
    rngs = {t: random.Random(f"eureka-synthetic/{split}/{seed}/{t}/{image_size}")
            for t in dict.fromkeys(task_list)}
    examples: list[Example] = []
    for i in range(n):
        task = task_list[i % len(task_list)]
        while True:
            ex = make_example(task, rngs[task], image_size)
            if split_of(ex.key) == split:
                break
        ex.id = f"{split}-{seed}-{i:06d}-{ex.id}"
        examples.append(ex)
    return examples


def write_jsonl(examples: Sequence[Example], out_dir: str | os.PathLike) -> Path:
    """Save images as PNGs under out_dir/images/ and rows in out_dir/data.jsonl (atomically).

    Rows use the plain format {"id", "images": ["images/<id>.png"], "question", "answer", "task"},
    image paths relative to the jsonl's directory, so the folder can be moved as a whole (`task`
    is what `eval` breaks results down by).
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for ex in examples:
        rel = f"images/{ex.id}.png"
        ex.image.save(out / rel, format="PNG")
        lines.append(json.dumps({"id": ex.id, "images": [rel], "question": ex.question,
                                 "answer": ex.answer, "task": ex.task}))
    path = out / "data.jsonl"
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------
# generators: each returns (image, question, answer, choices, params)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def _check_size(image_size: int) -> None:
    # Qwen2.5-VL needs whole 2x2-merged 14-px patches; 56 is the smallest with >= 5 cells spare.
    if not isinstance(image_size, int) or image_size < 56 or image_size % (2 * CELL):
        raise ValueError(f"image_size must be a multiple of 28 and >= 56, got {image_size!r}")


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (size, size), (0, 0, 0))
    return image, ImageDraw.Draw(image)


def _gen_count_circles(rng: random.Random, size: int):
    """1-5 filled circles, one per 14-px cell, never touching: count = connected blobs."""
    grid = size // CELL
    k = rng.randint(1, MAX_COUNT)
    cells = sorted(rng.sample(range(grid * grid), k))
    color = rng.randrange(len(PALETTE))
    image, draw = _canvas(size)
    circles = []
    for cell in cells:
        d = rng.randint(7, 10)                       # diameter; 1-px margin inside the cell
        ox, oy = rng.randint(1, CELL - 1 - d), rng.randint(1, CELL - 1 - d)
        x0, y0 = (cell % grid) * CELL + ox, (cell // grid) * CELL + oy
        draw.ellipse([x0, y0, x0 + d - 1, y0 + d - 1], fill=PALETTE[color])
        circles.append([cell, ox, oy, d])
    return (image, "How many circles are in the image?", str(k), None,
            {"circles": circles, "color": color})


def _draw_digit(draw: ImageDraw.ImageDraw, digit: int, x: int, y: int, w: int, h: int,
                t: int, color: tuple[int, int, int]) -> None:
    """A 7-segment digit in the box (x, y, w, h) with stroke thickness t."""
    mid = y + (h - t) // 2
    boxes = {
        "a": (x, y, x + w - 1, y + t - 1),
        "d": (x, y + h - t, x + w - 1, y + h - 1),
        "g": (x, mid, x + w - 1, mid + t - 1),
        "f": (x, y, x + t - 1, mid + t - 1),
        "b": (x + w - t, y, x + w - 1, mid + t - 1),
        "e": (x, mid, x + t - 1, y + h - 1),
        "c": (x + w - t, mid, x + w - 1, y + h - 1),
    }
    for seg in SEGMENTS[digit]:
        draw.rectangle(boxes[seg], fill=color)


def _gen_read_digit(rng: random.Random, size: int):
    """One large 7-segment digit, jittered in position, size and colour."""
    digit = rng.randint(0, 9)
    w, h, t = rng.randint(size // 4, size // 3), rng.randint(size // 2, 2 * size // 3), rng.randint(3, 4)
    x, y = rng.randint(2, size - 2 - w), rng.randint(2, size - 2 - h)
    color = rng.randrange(len(PALETTE))
    image, draw = _canvas(size)
    _draw_digit(draw, digit, x, y, w, h, t, PALETTE[color])
    return (image, "What digit is shown?", str(digit), None,
            {"digit": digit, "box": [x, y, w, h, t], "color": color})


def _gen_sum_digits(rng: random.Random, size: int):
    """Two 7-segment digits, one in each half of the image; the answer is their sum."""
    digits = [rng.randint(0, 9), rng.randint(0, 9)]
    color = rng.randrange(len(PALETTE))
    image, draw = _canvas(size)
    half = size // 2
    boxes = []
    for i, digit in enumerate(digits):
        w, h, t = rng.randint(half // 3, half // 2), rng.randint(size // 3, size // 2), 3
        x = i * half + rng.randint(2, half - 2 - w)
        y = rng.randint(2, size - 2 - h)
        _draw_digit(draw, digit, x, y, w, h, t, PALETTE[color])
        boxes.append([x, y, w, h, t])
    return (image, "What is the sum of the two digits?", str(sum(digits)), None,
            {"digits": digits, "boxes": boxes, "color": color})


def _gen_tallest_bar(rng: random.Random, size: int):
    """Three bars A, B, C left to right on a common baseline; heights differ by >= 6 px."""
    floor, top = 4, size - 4                         # heights drawn from [floor, top)
    while True:
        heights = [rng.randint(floor, top - 1) for _ in BAR_LETTERS]
        ordered = sorted(heights)
        if ordered[-1] - ordered[-2] >= 6 and ordered[1] - ordered[0] >= 1:
            break
    slot = size // 3
    width = rng.randint(slot // 2, slot - 4)
    colors = [rng.randrange(len(PALETTE)) for _ in BAR_LETTERS]
    image, draw = _canvas(size)
    base = size - 2
    for i, hgt in enumerate(heights):
        x0 = i * slot + (slot - width) // 2
        draw.rectangle([x0, base - hgt + 1, x0 + width - 1, base], fill=PALETTE[colors[i]])
    answer = BAR_LETTERS[heights.index(max(heights))]
    question = ("The bars are labelled A, B and C from left to right. "
                "Which bar is tallest? Answer with A, B or C.")
    return (image, question, answer, list(BAR_LETTERS),
            {"heights": heights, "width": width, "colors": colors})


_GENERATORS = {
    "count_circles": _gen_count_circles,
    "read_digit": _gen_read_digit,
    "tallest_bar": _gen_tallest_bar,
    "sum_digits": _gen_sum_digits,
}
