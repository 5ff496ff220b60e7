"""Preflight on the solver and the files to start from: testing that never happens or cannot, test_iter against the
validation set, base_lr 0, a .caffemodel given as --snapshot. The real Caffe shows what the check prevents."""
from __future__ import annotations

import re

import pytest

from caffetune.train import checks_solver

from helpers import caffe_train, save_random_weights, write_tiny_lmdb
from preflight_helpers import (
    assert_clean,
    check_text,
    edited,
    fatal_line,
    only,
    tiny_setup,
)


@pytest.fixture()
def setup(tmp_path):
    net, solver = tiny_setup(tmp_path / "tiny")
    return tmp_path, net, solver


# --- 7. a TEST phase that caffe never runs --------------------------------------------------------------------------
def test_a_net_with_a_test_phase_and_no_test_iter_is_a_warning_and_caffe_never_tests(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, ("test_iter: 2\ntest_interval: 10\n", ""))
    report = check_text(net.read_text(), solver_text=solver_text)
    assert report.problems == []
    message = only(report.warnings)
    assert "has a TEST phase (e.g. layer data) but the solver has no test_iter, so caffe never tests" in message
    assert "no best.caffemodel and no early stopping" in message and "--epochs N" in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode == 0 and "Optimization Done" in result.stderr
    assert "Testing net" not in result.stderr and "Test net output" not in result.stderr


def test_test_iter_without_test_interval_is_an_error_and_caffe_stops(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, ("test_interval: 10\n", ""))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert "test_iter is set but test_interval is 0" in message and "set test_interval" in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode != 0 and "test_interval() > 0" in fatal_line(result)


def test_base_lr_unset_is_an_error_and_zero_a_warning(setup):
    _, net, solver = setup
    message = only(check_text(net.read_text(), solver_text=edited(solver, ("base_lr: 0.01\n", ""))).problems)
    assert "base_lr is 0 (unset)" in message and "learns nothing" in message
    report = check_text(net.read_text(), solver_text=edited(solver, ("base_lr: 0.01", "base_lr: 0")))
    assert report.problems == [] and "solver: base_lr is 0: every update" in only(report.warnings)


# --- 13. test_iter x batch_size against the validation set ---------------------------------------------------------
@pytest.mark.parametrize("test_iter, expected", [
    (1, "each test pass reads 1 x 8 = 8 of the 16 validation images"),
    (4, "each test pass reads 4 x 8 = 32 images from a validation set of 16"),
])
def test_test_iter_not_covering_the_validation_set_is_a_warning(setup, test_iter, expected):
    _, net, solver = setup
    solver_text = edited(solver, ("test_iter: 2", f"test_iter: {test_iter}"))
    report = check_text(net.read_text(), solver_text=solver_text)
    message = only(report.warnings)
    assert expected in message and "(fix: set test_iter: 2)" in message and report.problems == []
    assert "layer data" in message and "test_lmdb" in message


def test_a_last_partial_batch_is_accepted_and_the_fix_names_a_divisor(setup):
    folder, net, solver = setup
    twenty = write_tiny_lmdb(folder / "val20", count=20, seed=3)
    text = edited(net, (str(folder / "tiny" / "test_lmdb"), str(twenty)))
    assert_clean(check_text(text, solver_text=edited(solver, ("test_iter: 2", "test_iter: 3"))))
    message = only(check_text(text, solver_text=solver.read_text()).warnings)
    assert "set test_iter: 3 (or a batch_size that divides 20" in message


# --- 8. --snapshot given a .caffemodel -------------------------------------------------------------------------------
def test_a_caffemodel_given_as_snapshot_is_an_error_and_caffe_stops(setup, caffe_install):
    folder, net, solver = setup
    solver.write_text(solver.read_text().replace("max_iter: 20", "max_iter: 2") + "snapshot: 2\n")
    assert caffe_train(caffe_install, solver).returncode == 0
    model, state = folder / "tiny" / "snap_iter_2.caffemodel", folder / "tiny" / "snap_iter_2.solverstate"
    assert checks_solver.file_kind(model) == "caffemodel" and checks_solver.file_kind(state) == "solverstate"
    message = only(check_text(net.read_text(), snapshot=model).problems)
    assert f"--snapshot {model} is a .caffemodel (weights), not a .solverstate" in message
    assert f"pass --weights {model}" in message and f"its solver state would be {state}" in message
    result = caffe_train(caffe_install, solver, f"-snapshot={model}")
    assert result.returncode != 0 and "state.history_size() == history_.size()" in fatal_line(result)
    message = only(check_text(net.read_text(), weights=[state]).problems)
    assert re.search(r"--weights \S+snap_iter_2.solverstate is a .solverstate, not a .caffemodel", message)


def test_a_solverstate_and_random_weights_are_accepted(setup, caffe_install):
    folder, net, _ = setup
    weights = save_random_weights(caffe_install, net, folder / "w.caffemodel")
    assert checks_solver.file_kind(weights) == "caffemodel"
    assert_clean(check_text(net.read_text(), weights=[weights]))
