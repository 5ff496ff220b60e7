"""Run every shell example of README.md and docs/*.md, in order, in a scratch folder: `make docs-check`.

Each ```sh block runs in bash (-e -o pipefail) from the scratch folder, which holds a link to the repository's
.venv, so `.venv/bin/caffetune` and `source .venv/bin/activate` work as they do in the repository. The pages run in
the order the README's tour builds on (the tour writes tour/, the pages continue from it). A block right after an
HTML comment `<!-- docs-check: skip (why) -->` is not run (benchmarks, `make test`).

    .venv/bin/python tools/docs_check.py [PAGE.md ...] [--keep DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ORDER = ["README.md", "docs/install.md", "docs/data.md", "docs/surgery.md", "docs/transfer.md", "docs/train.md",
         "docs/report.md", "docs/demo.md", "docs/architecture.md", "docs/development.md", "docs/benchmarks.md"]
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```sh\n(?P<body>.*?)\n```", re.S)


def blocks(page: Path) -> list[tuple[int, str, bool]]:
    """(line, script, skipped) of every ```sh block of a page."""
    text = page.read_text()
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("body"))
        found.append((line, match.group("body"), "docs-check: skip" in match.group("before")))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages to run (default: README.md and docs/, in tour order)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    pages = [Path(p) for p in args.pages] or [REPO / p for p in ORDER if (REPO / p).is_file()] + sorted(
        p for p in (REPO / "docs").glob("*.md") if str(p.relative_to(REPO)) not in ORDER)
    work = args.keep or Path(tempfile.mkdtemp(prefix="caffetune-docs-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / ".venv").exists():
        (work / ".venv").symlink_to(REPO / ".venv")
    env = dict(os.environ, PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    failed = 0
    for page in pages:
        for line, script, skipped in blocks(page):
            where = f"{page.relative_to(REPO) if page.is_relative_to(REPO) else page}:{line}"
            if skipped:
                print(f"skip  {where}", flush=True)
                continue
            started = time.monotonic()
            result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                                    capture_output=True, text=True)
            status = "ok  " if result.returncode == 0 else "FAIL"
            print(f"{status}  {where}  ({time.monotonic() - started:.0f} s)", flush=True)
            if result.returncode != 0:
                failed += 1
                print("      " + "\n      ".join((result.stdout + result.stderr).strip().splitlines()[-15:]))
    print(f"{failed} example block(s) failed; scratch folder {work}")
    if not args.keep and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
