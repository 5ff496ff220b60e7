"""Reading a run's solver and nets: a net file the solver names is looked up from the current folder (as caffe
does) and from the solver's folder; the error when it is in neither says both places and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffetune.errors import RunError
from caffetune.train import run_dir, runner

NET = 'name: "n" layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 } } }\n'


def _prepare(solver: Path, base: Path):
    return run_dir.prepare(runner.RunOptions(solver=solver), base=base)


def test_a_net_relative_to_the_solver_s_folder_is_found(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "net.prototxt").write_text(NET)
    (tmp_path / "model" / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\n')
    prepared = _prepare(Path("model/solver.prototxt"), tmp_path)
    assert prepared.source_paths["net.prototxt"] == tmp_path / "model" / "net.prototxt"


def test_a_missing_net_file_says_where_it_was_looked_for_and_the_fix(tmp_path):
    (tmp_path / "model").mkdir()
    solver = tmp_path / "model" / "solver.prototxt"
    solver.write_text('train_net: "nets/train.prototxt"\nbase_lr: 0.1\n')
    with pytest.raises(RunError) as caught:
        _prepare(Path("model/solver.prototxt"), tmp_path)
    error = caught.value
    assert error.where == str(solver)
    assert error.what == (f'the solver\'s train_net: "nets/train.prototxt" names no file: looked for '
                          f"{tmp_path}/nets/train.prototxt (from the current folder, as caffe resolves it) and "
                          f"{tmp_path}/model/nets/train.prototxt (from the solver's folder)")
    assert "correct the solver's train_net: path" in error.fix and str(tmp_path / "model") in error.fix


def test_a_missing_absolute_net_path_names_that_one_path(tmp_path):
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{tmp_path}/gone.prototxt"\ntest_net: "{tmp_path}/gone.prototxt"\nbase_lr: 0.1\n')
    with pytest.raises(RunError) as caught:
        _prepare(solver, tmp_path)
    assert caught.value.what.endswith(f"names no file: looked for {tmp_path}/gone.prototxt")
