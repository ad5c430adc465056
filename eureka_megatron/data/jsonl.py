"""Prompt rows from JSONL: MM-Eureka's two formats and a plain one, detected per row.

Formats (one JSON object per line):
  qwen      {"id", "message": "<JSON list of {role, content}>", "answer"} -- MM-Eureka's Qwen
            branch. `message` is a *string* holding the chat (a list is accepted too); content is
            a string or a list of {"type": "image", "image": "file:///..."} and {"type": "text",
            "text": ...} items. A system message becomes `Row.system_prompt`.
  internvl  {"conversations": [{"from": "system"|"human"|"gpt", "value"}...], "image_urls": [...],
            "answer"?} -- MM-Eureka's InternVL branch ("images"/"image" accepted for the paths);
            the gold answer is "answer" when present, else the gpt turn.
  plain     {"id"?, "images": [...] (or "image": path), "question", "answer"} -- what
            `data.synthetic.write_jsonl` writes.

Why rows are skipped instead of failing the run: a 50k-row dataset converted by hand (MM-Eureka
issue #44) usually has a handful of broken rows; stopping a cluster job at row 31,337 helps
nobody. Each bad row is logged with file:line and the reason and counted in
`LoadResult.skipped`; a missing file, or one with no usable row at all, is a `DataError`.

Images are only checked for existence here (decoding 50k images at load time would take
minutes); a corrupt image surfaces when the prompt is built (`data.dataset`).
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eureka_megatron.errors import UserError

__all__ = ["DataError", "Row", "SkippedRow", "LoadResult", "load_rows", "FORMATS"]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "qwen", "internvl", "plain")
IMAGE_PLACEHOLDER = "<image>"
_LOGGED_SKIPS = 20  # individual warnings per file; the rest are counted in the summary


class DataError(UserError, ValueError):
    """Input data that cannot be used: a missing file, no valid rows, a corrupt image."""


@dataclass
class Row:
    id: str
    images: list[str]       # absolute paths of existing files
    question: str
    answer: str
    source: str             # "path/to/file.jsonl:LINE" (1-based)
    system_prompt: str | None = None
    meta: dict = field(default_factory=dict)  # the row's other fields (e.g. "task")


@dataclass
class SkippedRow:
    source: str
    reason: str


@dataclass
class LoadResult:
    rows: list[Row]
    skipped: list[SkippedRow]


class _BadRow(Exception):
    """Internal: the reason one row is unusable."""


def load_rows(path: str | os.PathLike, fmt: str = "auto") -> LoadResult:
    """Every usable row of a JSONL file (or of `<dir>/data.jsonl`), bad rows skipped and counted."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    file = Path(path)
    if file.is_dir():
        file = file / "data.jsonl"
    if not file.is_file():
        raise DataError(f"data file not found: {file}")
    base = file.parent.resolve()
    rows: list[Row] = []
    skipped: list[SkippedRow] = []
    with open(file, "rb") as f:  # decoded per line: one bad byte costs one row, not the file
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            source = f"{file}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise _BadRow(f"not valid UTF-8 (byte {e.start})") from None
                rows.append(_parse_line(line, fmt, base, source))
            except _BadRow as e:
                skipped.append(SkippedRow(source, str(e)))
                if len(skipped) <= _LOGGED_SKIPS:
                    logger.warning("skipping row %s: %s", source, e)
    if skipped:
        warnings.warn(f"{file}: skipped {len(skipped)} of {len(rows) + len(skipped)} rows "
                      f"(first: {skipped[0].source}: {skipped[0].reason})", stacklevel=2)
    if not rows:
        first = f"; first problem: {skipped[0].source}: {skipped[0].reason}" if skipped else ""
        raise DataError(f"{file} has no usable rows ({len(skipped)} skipped){first}")
    return LoadResult(rows, skipped)


# --- one line ------------------------------------------------------------------------------


def _parse_line(line: str, fmt: str, base: Path, source: str) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRow(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _BadRow(f"a row must be a JSON object, got {type(obj).__name__}")
    kind = _detect(obj) if fmt == "auto" else fmt
    parse = {"qwen": _parse_qwen, "internvl": _parse_internvl, "plain": _parse_plain}[kind]
    question, answer, images, system, used = parse(obj)
    if not question.strip():
        raise _BadRow("empty question")
    if not answer.strip():
        raise _BadRow("empty answer")
    row_id = obj.get("id")
    if row_id is None:
        row_id = f"{Path(source.rsplit(':', 1)[0]).stem}-{source.rsplit(':', 1)[1]}"
    elif isinstance(row_id, (str, int)) and not isinstance(row_id, bool):
        row_id = str(row_id)
    else:
        raise _BadRow(f"'id' must be a string or integer, got {type(row_id).__name__}")
    meta = {k: v for k, v in obj.items() if k not in used and k != "id"}
    return Row(id=row_id, images=[_resolve_image(p, base) for p in images], question=question,
               answer=answer, source=source, system_prompt=system, meta=meta)


def _detect(obj: dict) -> str:
    if "message" in obj:
        return "qwen"
    if "conversations" in obj:
        return "internvl"
    if "question" in obj:
        return "plain"
    raise _BadRow("unknown row format: expected a 'message' (MM-Eureka Qwen), 'conversations' "
                  "(MM-Eureka InternVL) or 'question' (plain) field")


def _text(value: Any, what: str) -> str:
    """A string field; numbers are accepted for answers written as JSON numbers (e.g. 42)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise _BadRow(f"missing {what}")
    raise _BadRow(f"{what} must be a string, got {type(value).__name__}")


def _image_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(p, str) for p in value):
        return list(value)
    raise _BadRow(f"'{key}' must be a path or a list of paths")


def _parse_plain(obj: dict):
    if "images" in obj:
        images, key = _image_list(obj["images"], "images"), "images"
    else:
        images, key = _image_list(obj.get("image"), "image"), "image"
    question = _text(obj.get("question"), "'question'")
    answer = _text(obj.get("answer"), "'answer'")
    return question, answer, images, None, {"question", "answer", key}


def _parse_qwen(obj: dict):
    messages = obj.get("message")
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise _BadRow(f"'message' is not a JSON-encoded chat ({e.msg})") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _BadRow("'message' must hold a list of {role, content} messages")
    system, users = None, []
    for m in messages:
        role = m.get("role")
        if role == "system":
            system, _ = _qwen_content(m.get("content"))
        elif role == "user":
            users.append(m)
        elif role != "assistant":
            raise _BadRow(f"unknown message role {role!r}")
    if len(users) != 1:
        raise _BadRow(f"expected exactly one user message, found {len(users)}")
    question, images = _qwen_content(users[0].get("content"))
    answer = _text(obj.get("answer"), "'answer'")
    return question, answer, images, system, {"message", "answer"}


def _qwen_content(content: Any) -> tuple[str, list[str]]:
    """(text, image paths) of one message. Images that come after some text keep their place as
    `<image>` placeholders, so the prompt shows them where the chat template would."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise _BadRow("message content must be a string or a list of items")
    parts: list[str] = []
    images: list[str] = []
    seen_text = False
    pending = 0  # images before any text: rendered in front of the question
    for item in content:
        if not isinstance(item, dict):
            raise _BadRow("content items must be objects")
        kind = item.get("type")
        if kind == "text":
            parts.append(_text(item.get("text"), "text item"))
            seen_text = seen_text or bool(parts[-1])
        elif kind in ("image", "image_url"):
            path = item.get("image", item.get("image_url"))
            if isinstance(path, dict):  # OpenAI style {"image_url": {"url": ...}}
                path = path.get("url")
            if not isinstance(path, str):
                raise _BadRow("image item without a path")
            images.append(path)
            if seen_text:
                parts.append(IMAGE_PLACEHOLDER)
            else:
                pending += 1
        else:
            raise _BadRow(f"unknown content item type {kind!r}")
    text = "".join(parts)
    if pending and IMAGE_PLACEHOLDER in text:  # mixed: make every image explicit
        text = IMAGE_PLACEHOLDER * pending + text
    return text, images


_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")


def _parse_internvl(obj: dict):
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise _BadRow("'conversations' must be a list of {from, value} turns")
    system = question = reply = None
    for t in turns:
        who, value = t.get("from"), t.get("value")
        if who == "system":
            system = _text(value, "system turn")
        elif who in _HUMAN:
            if question is not None:
                raise _BadRow("expected exactly one human turn")
            question = _text(value, "human turn")
        elif who in _GPT:
            reply = value
        else:
            raise _BadRow(f"unknown conversation role {who!r}")
    if question is None:
        raise _BadRow("no human turn in 'conversations'")
    answer = _text(obj["answer"] if "answer" in obj else reply, "answer ('answer' or a gpt turn)")
    key = next((k for k in ("image_urls", "images", "image") if k in obj), "image_urls")
    images = _image_list(obj.get(key), key)
    n_marks = question.count(IMAGE_PLACEHOLDER)
    if n_marks and n_marks != len(images):
        raise _BadRow(f"question has {n_marks} {IMAGE_PLACEHOLDER} placeholders for "
                      f"{len(images)} images")
    return question, answer, images, system, {"conversations", "answer", key}


def _resolve_image(path: str, base: Path) -> str:
    if path.startswith("file://"):
        path = path[len("file://"):]
    if "://" in path or path.startswith("data:"):
        raise _BadRow(f"only local image files are supported, got {path[:80]!r}")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = base / p
    if not p.is_file():
        raise _BadRow(f"image not found: {p}")
    return str(p)
