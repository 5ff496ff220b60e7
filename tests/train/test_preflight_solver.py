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


# --- the learning-rate schedule and the solver type ------------------------------------------------------------------
STEP = 'lr_policy: "step" gamma: 0.5 stepsize: 10'


def test_an_unknown_lr_policy_is_an_error_and_caffe_stops_at_the_first_update(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, ('lr_policy: "step"', 'lr_policy: "steps"'))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert 'solver: lr_policy "steps" is not a learning-rate policy caffe knows' in message
    assert 'use lr_policy: "step"' in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode != 0 and "Unknown learning rate policy: steps" in fatal_line(result)


def test_a_solver_without_lr_policy_is_an_error_and_caffe_stops(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, (STEP, ""))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert "the solver has no lr_policy (it has no default)" in message and 'lr_policy: "fixed"' in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode != 0 and "Unknown learning rate policy" in fatal_line(result)


def test_step_without_stepsize_is_an_error_and_caffe_stops(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, (" stepsize: 10", ""))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert 'lr_policy "step" without a stepsize' in message and "set stepsize" in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode != 0 and "stepsize() > 0" in fatal_line(result)


def test_step_without_gamma_is_an_error_and_caffe_drops_the_rate_to_zero(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, (STEP, 'lr_policy: "step" stepsize: 2'))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert 'lr_policy "step" with gamma 0 (unset: gamma has no default)' in message
    assert "becomes 0 at the first step" in message and "gamma: 0.1" in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode == 0
    rates = {int(it): float(lr) for it, lr in re.findall(r"Iteration (\d+), lr = (\S+)", result.stderr)}
    assert rates[1] == 0.01 and rates[2] == 0 and rates[19] == 0   # it silently stops learning at the first step


@pytest.mark.parametrize("schedule, expected", [
    ('lr_policy: "step" gamma: 0 stepsize: 10', 'lr_policy "step" with gamma 0: '),
    ('lr_policy: "step" gamma: 10 stepsize: 10', "makes the rate grow at each step"),
    ('lr_policy: "multistep" gamma: 0.1', 'lr_policy "multistep" without any stepvalue: the rate never drops'),
])
def test_odd_schedules_are_warnings(setup, schedule, expected):
    _, net, solver = setup
    report = check_text(net.read_text(), solver_text=edited(solver, (STEP, schedule)))
    assert report.problems == [] and expected in only(report.warnings)


@pytest.mark.parametrize("schedule", ['lr_policy: "fixed"', 'lr_policy: "inv" gamma: 0.0001 power: 0.75',
                                      'lr_policy: "multistep" gamma: 0.1 stepvalue: 10 stepvalue: 15',
                                      'lr_policy: "poly" power: 1', 'lr_policy: "exp" gamma: 0.99'])
def test_usual_schedules_are_clean(setup, schedule):
    _, net, solver = setup
    assert_clean(check_text(net.read_text(), solver_text=edited(solver, (STEP, schedule))))


def test_a_solver_type_in_the_wrong_case_is_an_error_and_caffe_stops(setup, caffe_install):
    _, net, solver = setup
    solver_text = edited(solver, ("momentum: 0.9\n", 'type: "adam"\n'))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert 'solver type "adam" is not a solver caffe knows (names are case-sensitive)' in message
    assert 'write type: "Adam"' in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode != 0 and "Unknown solver type: adam" in fatal_line(result)
    assert_clean(check_text(net.read_text(), solver_text=solver_text.replace('"adam"', '"Adam"')))


def test_solver_type_and_the_old_enum_together_are_an_error_and_caffe_stops(setup, caffe_install):
    _, net, solver = setup
    solver_text = solver.read_text() + 'type: "Nesterov"\nsolver_type: NESTEROV\n'
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert "the solver sets both solver_type (the old enum) and type" in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)
    assert result.returncode != 0 and "cannot be both specified" in result.stderr


def test_max_iter_unset_or_zero_is_an_error_and_caffe_trains_nothing(setup, caffe_install):
    _, net, solver = setup
    max_iter = re.search(r"max_iter: \d+\n", solver.read_text()).group(0)
    message = only(check_text(net.read_text(), solver_text=edited(solver, (max_iter, ""))).problems)
    assert "solver: max_iter is 0 (unset: it defaults to 0)" in message and "--max-iter N" in message
    solver_text = edited(solver, (max_iter, "max_iter: 0\n"))
    message = only(check_text(net.read_text(), solver_text=solver_text).problems)
    assert "max_iter is 0:" in message and "unset" not in message
    solver.write_text(solver_text)
    result = caffe_train(caffe_install, solver)   # caffe "succeeds" having trained no iteration
    assert result.returncode == 0 and "Optimization Done" in result.stderr
    assert not re.search(r"Iteration [1-9]\d*", result.stderr)
