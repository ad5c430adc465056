"""Whole-file writes that a kill cannot tear: readers see the old file or the new one, never half.

The content goes to a temporary file beside the target (same filesystem), is fsynced, and
replaces the target with `os.replace`; on any failure (a kill's KeyboardInterrupt included) the
temporary file is removed and the target is left as it was. Torch-free.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields the temporary path to write (e.g. with `torch.save`); when the block ends without
    an error it replaces `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`path.write_text(text)` (UTF-8), all or nothing."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fsync_dir(d: Path) -> None:
    """Make the rename durable (best effort: not every OS/filesystem allows fsync on a dir)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
