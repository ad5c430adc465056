"""`eureka_megatron.atomic`: a failure while the new content is written leaves the old file
whole and no temporary file behind."""
import os

import pytest

from eureka_megatron.atomic import replacing, write_text_atomic


def test_write_replaces_the_whole_file(tmp_path):
    p = tmp_path / "results.json"
    write_text_atomic(p, "old")
    write_text_atomic(p, "new ✓")
    assert p.read_text(encoding="utf-8") == "new ✓"
    assert os.listdir(tmp_path) == ["results.json"]


def test_a_failure_mid_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with replacing(p) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the n")
                f.flush()
                raise RuntimeError("disk full")
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(p, "new\n\ud800")  # fails while the text is encoded
    assert p.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["data.jsonl"]


def test_a_kill_before_the_rename_leaves_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "logits.pt"
    p.write_bytes(b"old")

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        with replacing(p) as tmp:
            tmp.write_bytes(b"new")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["logits.pt"]
