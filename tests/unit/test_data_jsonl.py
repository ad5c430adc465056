"""JSONL loading: the three row formats (as MM-Eureka writes them), path resolution, extra
fields kept as meta, and bad rows skipped with file:line + reason instead of aborting; plus
image decoding (RGB, alpha over white, errors naming the file)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eureka_megatron.data.images import load_image
from eureka_megatron.data.jsonl import DataError, LoadResult, Row, load_rows
from eureka_megatron.data.synthetic import synthetic_dataset, write_jsonl


def _png(path: Path, color=(10, 20, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _qwen_row(image: str, question: str, answer="2", system=None, **extra) -> dict:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]})
    return {"id": "q1", "message": json.dumps(msgs), "answer": answer, **extra}


# --- the three formats ------------------------------------------------------------------


def test_plain_rows_from_synthetic_directory(tmp_path):
    examples = synthetic_dataset(6, seed=3)
    write_jsonl(examples, tmp_path / "syn")
    res = load_rows(tmp_path / "syn")  # a directory means its data.jsonl
    assert isinstance(res, LoadResult) and res.skipped == []
    assert [r.id for r in res.rows] == [e.id for e in examples]
    for i, (row, ex) in enumerate(zip(res.rows, examples)):
        assert row.question == ex.question and row.answer == ex.answer
        assert row.system_prompt is None and row.meta == {"task": ex.task}
        assert row.source == f"{tmp_path / 'syn' / 'data.jsonl'}:{i + 1}"
        (path,) = row.images
        assert os.path.isabs(path) and path == str(tmp_path / "syn" / "images" / f"{ex.id}.png")
        assert np.array_equal(np.asarray(load_image(path)), np.asarray(ex.image.convert("RGB")))


def test_qwen_format_message_string(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    absolute = _png(tmp_path / "elsewhere" / "b.png")
    f = _write(tmp_path / "d.jsonl", [
        _qwen_row("file://imgs/a.png", "What is 1+1?", system="Think first.", task="math"),
        _qwen_row(f"file://{absolute}", "How many?", answer="\\frac{1}{2}"),
        {"id": 7, "message": json.dumps([{"role": "user", "content": "Text only?"}]), "answer": 3},
    ])
    rows = load_rows(f).rows
    assert rows[0] == Row(id="q1", images=[str(tmp_path / "imgs" / "a.png")],
                          question="What is 1+1?", answer="2", source=f"{f}:1",
                          system_prompt="Think first.", meta={"task": "math"})
    assert rows[1].images == [str(absolute)] and rows[1].answer == "\\frac{1}{2}"
    assert rows[1].system_prompt is None
    # numeric id and answer are accepted as their string form; string content means no image
    assert (rows[2].id, rows[2].answer, rows[2].images, rows[2].question) == ("7", "3", [], "Text only?")


def test_qwen_images_after_text_keep_their_place(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    content = [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Compare "},
               {"type": "image", "image": "b.png"}, {"type": "text", "text": " with the first."}]
    f = _write(tmp_path / "d.jsonl", [
        {"message": json.dumps([{"role": "user", "content": content}]), "answer": "x"}])
    (row,) = load_rows(f).rows
    assert row.question == "<image>Compare <image> with the first."
    assert row.images == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert row.id == "d-1"  # no id: file stem and line


def test_internvl_format(tmp_path):
    _png(tmp_path / "i.png")
    f = _write(tmp_path / "v.jsonl", [
        {"conversations": [{"from": "human", "value": "<image>\nFind x."},
                           {"from": "gpt", "value": "5"}],
         "image_urls": ["file://i.png"]},
        {"conversations": [{"from": "system", "value": "You are InternVL."},
                           {"from": "human", "value": "Find y."}],
         "answer": "6", "images": [str(tmp_path / "i.png")], "subject": "geometry"},
        {"conversations": [{"from": "human", "value": "Find z."}, {"from": "gpt", "value": "ignored"}],
         "answer": "7", "image": "i.png"},
    ])
    a, b, c = load_rows(f).rows
    assert (a.question, a.answer, a.images) == ("<image>\nFind x.", "5", [str(tmp_path / "i.png")])
    assert a.system_prompt is None
    assert (b.question, b.answer, b.system_prompt, b.meta) == ("Find y.", "6", "You are InternVL.",
                                                              {"subject": "geometry"})
    assert c.answer == "7" and c.images == [str(tmp_path / "i.png")]  # "answer" wins over gpt


def test_forced_format(tmp_path):
    _png(tmp_path / "a.png")
    f = _write(tmp_path / "d.jsonl", [_qwen_row("a.png", "Q?"),
                                      {"question": "plain?", "answer": "1", "images": []}])
    with pytest.warns(UserWarning):
        res = load_rows(f, fmt="plain")
    assert [r.question for r in res.rows] == ["plain?"]
    assert res.skipped[0].source == f"{f}:1" and "question" in res.skipped[0].reason
    with pytest.raises(ValueError, match="unknown data format"):
        load_rows(f, fmt="sharegpt")


# --- bad rows -------------------------------------------------------------------------------


def test_bad_rows_are_skipped_with_file_line_and_reason(tmp_path, caplog):
    _png(tmp_path / "ok.png")
    good = {"question": "Q", "answer": "A", "images": ["ok.png"]}
    cases = [
        ('{"question": "Q", "answer": ', "invalid JSON"),
        ({"question": "Q", "images": ["ok.png"]}, "missing 'answer'"),
        ({"question": "   ", "answer": "A"}, "empty question"),
        ({"question": "Q", "answer": ""}, "empty answer"),
        ({"question": ["Q"], "answer": "A"}, "'question' must be a string"),
        ({"question": "Q", "answer": "A", "images": ["missing.png"]}, "image not found"),
        ({"question": "Q", "answer": "A", "images": [3]}, "list of paths"),
        ({"question": "Q", "answer": "A", "images": ["http://x/y.png"]}, "only local image"),
        ({"prompt": "Q", "answer": "A"}, "unknown row format"),
        ({"message": "[{not json", "answer": "A"}, "JSON-encoded chat"),
        ({"message": json.dumps([{"role": "system", "content": "s"}]), "answer": "A"},
         "exactly one user message"),
        ({"conversations": [{"from": "human", "value": "<image><image> Q"}], "answer": "A",
          "image_urls": ["ok.png"]}, "2 <image> placeholders for 1 images"),
        ({"conversations": [{"from": "human", "value": "Q"}]}, "answer"),
        ([1, 2], "JSON object"),
        ({"question": "Q", "answer": True}, "'answer' must be a string"),
    ]
    lines = [good] + [c for c, _ in cases] + ["", good]  # a blank line is ignored, not counted
    f = _write(tmp_path / "d.jsonl", lines)
    cases.append(("", "not valid UTF-8"))  # a latin-1 byte in an otherwise fine row
    with open(f, "ab") as fh:
        fh.write(b'{"question": "caf\xe9", "answer": "A"}\n')
    with caplog.at_level(logging.WARNING, logger="eureka_megatron.data.jsonl"), \
            pytest.warns(UserWarning, match=f"skipped {len(cases)} of {len(cases) + 2} rows"):
        res = load_rows(f)
    assert [r.source for r in res.rows] == [f"{f}:1", f"{f}:{len(cases) + 2}"]
    assert [s.source for s in res.skipped] == \
        [f"{f}:{i + 2}" for i in range(len(cases) - 1)] + [f"{f}:{len(cases) + 3}"]
    for skipped, (_, reason) in zip(res.skipped, cases):
        assert reason in skipped.reason, (skipped, reason)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{f}:2" in logged and "invalid JSON" in logged


def test_missing_file_and_no_valid_rows_raise(tmp_path):
    with pytest.raises(DataError, match="not found.*nope.jsonl"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="data.jsonl"):
        load_rows(tmp_path)  # a directory without data.jsonl
    f = _write(tmp_path / "bad.jsonl", ["{oops", {"question": "Q"}])
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"bad.jsonl has no usable rows"):
        load_rows(f)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl has no usable rows"):
        load_rows(empty)


# --- images ----------------------------------------------------------------------------------


def test_load_image_rgb_alpha_and_errors(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (200, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (200, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (200, 0, 0)
    assert im.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, not black
    Image.new("L", (3, 2), 77).save(tmp_path / "g.jpg")
    g = load_image(str(tmp_path / "g.jpg"))
    assert g.mode == "RGB" and g.size == (3, 2) and g.getpixel((1, 1)) == (77, 77, 77)
    assert load_image(Image.new("L", (2, 2), 5)).getpixel((0, 0)) == (5, 5, 5)

    with pytest.raises(DataError, match="not found.*missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    good = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])  # truncated: fails at decode
    with pytest.raises(DataError, match="cut.png"):
        load_image(tmp_path / "cut.png")
