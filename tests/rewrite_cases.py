"""The golden cases of `caffetune rewrite` (tests/golden/rewrite/<case>/case.txt), shared by the schema-only and the
real-Caffe rewrite tests."""
from __future__ import annotations

import shlex
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GOLDEN = TESTS / "golden" / "rewrite"
DATA = TESTS / "data" / "rewrite"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "case.txt").is_file())


def read_case(name: str, caffe_source: Path) -> tuple[Path, list[str]]:
    fields = dict(line.split(": ", 1) for line in (GOLDEN / name / "case.txt").read_text().splitlines() if line)
    kind, _, relative = fields["input"].partition(":")
    base = caffe_source if kind == "caffe" else DATA
    return base / relative, shlex.split(fields["flags"])
