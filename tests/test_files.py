"""Caffetune.files: the one atomic writer, and the refusal to replace an existing output."""
from __future__ import annotations

import pytest

from caffetune import files
from caffetune.errors import CaffetuneError


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out" / "net.prototxt"
    files.write_atomic(target, "name: 'n'\n")
    assert target.read_text() == "name: 'n'\n"
    assert [p.name for p in target.parent.iterdir()] == ["net.prototxt"]


def test_an_interrupted_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "best.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_output(target) as handle:
            handle.write(b"half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["best.json"]


def test_an_existing_output_is_refused_unless_overwrite(tmp_path):
    target = tmp_path / "out.caffemodel"
    files.refuse_existing(target, overwrite=False)
    target.write_bytes(b"x")
    with pytest.raises(CaffetuneError, match="the output exists") as caught:
        files.refuse_existing(target, overwrite=False)
    assert "--overwrite" in caught.value.fix and caught.value.where == str(target)
    files.refuse_existing(target, overwrite=True)
