"""`--trials N` is the study's total: a worker does not run a trial when the finished trials and the ones running
ahead of it already make N; the trial it was given is recorded as not run (it does not count) and queued values
go back in the queue. No caffe: the objective stops before any run."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from caffetune.train import sweep, sweep_space, sweep_storage


@pytest.fixture()
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="total")


def _objective(tmp_path: Path, total: int) -> sweep._Objective:
    options = sweep.SweepOptions(solver=tmp_path / "solver.prototxt", name="total",
                                 space=sweep_space.parse(["base_lr=log:1e-3:1e-1"]), trials=total)
    return sweep._Objective(options, tmp_path, None, tmp_path, "maximize", lambda item: None)


def test_a_trial_runs_only_when_the_finished_and_earlier_running_trials_leave_a_place(study):
    study.tell(study.ask(), 0.5)                    # trial 0: finished
    first, second = study.ask(), study.ask()         # 1 and 2: two workers asking at once
    assert sweep.within_total(first, 2) and not sweep.within_total(second, 2)
    assert sweep.within_total(second, 3)
    study.tell(first, 0.6)                           # the earlier one finished: still no place for 2
    assert not sweep.within_total(second, 2)
    assert sweep_storage.counts(study) == (2, 1)


def test_a_trial_over_the_total_is_not_run_and_its_queued_values_go_back(study, tmp_path):
    other = study.ask()                              # trial 0: another worker's, running: the last place
    study.enqueue_trial({"base_lr": 0.01})           # trial 1: queued values (a --try)
    objective = _objective(tmp_path, total=1)
    study.optimize(objective, n_trials=5, catch=(sweep.TotalReached,))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.RUNNING, TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["note"] == sweep.NOT_RUN and objective.ran == []   # stopped at once, ran nothing
    assert trials[2].system_attrs["fixed_params"] == {"base_lr": 0.01}              # nothing lost
    assert sweep_storage.counts(study) == (0, 1)     # the not-run trial does not count as finished
    study.tell(other, 0.7)
    assert sweep_storage.counts(study) == (1, 0)
