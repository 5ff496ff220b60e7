"""What `caffetune run` starts (train.session): a plain resume, a staged resume, and where to continue from."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffetune.errors import RunError
from caffetune.train import runner, session, stages


def _result(run_dir: Path) -> runner.RunResult:
    return runner.RunResult(run_dir, "interrupted", 30, None, None, None, None, [], [])


def test_resume_of_a_folder_that_is_not_a_run_says_so(tmp_path):
    with pytest.raises(RunError, match="not a caffetune run directory") as caught:
        session.start_or_resume(lambda item: None, resume_dir=tmp_path)
    assert caught.value.where == str(tmp_path.resolve())


def test_a_staged_run_resumes_its_stages(tmp_path):
    root = tmp_path / "runs" / "two"
    (root / "stage1").mkdir(parents=True)
    (root / stages.STAGES_FILE).write_text('{"plan": {}, "solver": "s.prototxt", "weights": [], "options": {}}')
    with pytest.raises(RunError, match="not a caffetune run directory") as caught:
        session.start_or_resume(lambda item: None, resume_dir=root)
    assert caught.value.where == str(root / "stage1"), "the staged resume goes to the stopped stage"


def test_an_interrupted_stage_is_continued_from_its_parent(tmp_path):
    root = tmp_path / "runs" / "two"
    (root / "stage1").mkdir(parents=True)
    assert session.resume_target(_result(root / "stage1")) == root / "stage1", "not staged: the folder itself"
    (root / stages.STAGES_FILE).write_text("{}")
    assert session.resume_target(_result(root / "stage1")) == root
    assert session.resume_target(_result(tmp_path / "runs" / "plain")) == tmp_path / "runs" / "plain"


def test_starting_needs_options_or_a_run_to_resume():
    with pytest.raises(ValueError):
        session.start_or_resume(lambda item: None)
