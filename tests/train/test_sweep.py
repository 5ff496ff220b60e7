"""`caffetune sweep` over real tiny caffe runs: two worker processes sharing a SQLite study, pruning of a hopeless
trial (caffe snapshots and stops), and a worker killed mid-trial whose study is continued by running it again."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest

from caffetune.model import prototxt
from caffetune.train import sweep, sweep_results, sweep_space, sweep_storage
from caffetune.train.events import Progress

from sweep_helpers import check_trial_runs, finish, trials, worker, write_learnable_classifier

pytestmark = pytest.mark.caffe


def test_two_workers_share_a_sqlite_study_and_stop_at_its_total(caffe_install, tmp_path):
    _, solver = write_learnable_classifier(tmp_path / "data", max_iter=40, test_interval=10)
    args = ["--solver", str(solver), "--name", "lr", "--trials", "4", "--param", "base_lr=log:1e-3:1e-1",
            "--param", "freeze_through=choice:conv1,none", "--no-prune"]
    first, second = worker(tmp_path, *args, "--seed", "1"), worker(tmp_path, *args, "--seed", "2")
    outputs = [finish(first), finish(second)]
    root = tmp_path / "runs" / "lr"
    study = sweep_results.load("lr", None, base=tmp_path)
    # Exactly 4 finished trials. When both workers ask for the last place at once, the later trial is not run:
    # it is a FAIL with the note, not counted, and no worker ran it.
    complete = trials(study, optuna.trial.TrialState.COMPLETE)
    assert len(complete) == 4 and sweep_storage.counts(study) == (4, 0)
    assert all(t.user_attrs.get("note") == sweep.NOT_RUN and "worker" not in t.user_attrs
               for t in trials(study) if t not in complete)
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2                                   # both processes ran trials of the one study
    check_trial_runs(study)
    frozen = next(t for t in complete if t.params["freeze_through"] == "conv1")
    conv1 = next(layer for layer in prototxt.load(Path(frozen.user_attrs["run"]) / "train_val.prototxt").layer
                 if layer.name == "conv1")
    assert [p.lr_mult for p in conv1.param] == [0, 0]
    # A worker stops as soon as the finished trials and those the other one runs make the total.
    assert "4 of 4 trials finished in lr (this process ran" in outputs[1] or \
        "4 of 4 trials finished in lr (this process ran" in outputs[0]
    assert all(re.search(r"[34] of 4 trials finished in lr(, 1 running in other workers)? \(this process", output)
               for output in outputs), outputs
    best = json.loads((root / "best.json").read_text())
    assert best["value"] == max(t.value for t in complete)
    assert (root / "best.caffemodel").read_bytes() == (Path(best["run"]) / "best.caffemodel").read_bytes()
    assert len((root / "sweep.csv").read_text().splitlines()) == len(trials(study)) + 1
    assert (root / "history.png").read_bytes()[:4] == b"\x89PNG"
    # Running it again finds the study complete: no new trial.
    assert "4 of 4 trials finished" in finish(worker(tmp_path, *args))
    assert len(trials(sweep_results.load("lr", None, base=tmp_path))) == len(trials(study))
    shown = subprocess.run([sys.executable, "-m", "caffetune", "sweep", "--show", "lr", "--json"], cwd=tmp_path,
                           capture_output=True, text=True, check=True)
    data = json.loads(shown.stdout)
    assert [t["number"] for t in data["trials"] if t["state"] == "COMPLETE"] == [t.number for t in complete]
    assert data["best"]["number"] == best["number"]


def test_a_hopeless_trial_is_pruned_early_and_keeps_its_run(caffe_install, tmp_path):
    _, solver = write_learnable_classifier(tmp_path / "data", max_iter=20000, test_interval=1000)
    space = sweep_space.parse(["base_lr=log:1e-8:1e3"])
    seen = []
    options = sweep.SweepOptions(solver=solver, name="prune", space=space, trials=4, seed=0, prune_startup=2,
                                 enqueue=[{"base_lr": 0.01}, {"base_lr": 0.02}, {"base_lr": 1e-8},
                                          {"base_lr": 1e3}], heartbeat=5)
    result = sweep.run(options, callback=seen.append, base=tmp_path)
    study = sweep_results.load("prune", None, base=tmp_path)
    states = [t.state.name for t in trials(study)]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"] and result.ran == [0, 1, 2, 3]
    tiny, huge = trials(study)[2], trials(study)[3]
    # The absurdly small lr learns nothing: pruned at its first test pass after 0, where the others are at 1.0.
    assert tiny.user_attrs["note"] == "pruned at iteration 1000" and tiny.user_attrs["iterations"] < 20000
    assert min(trials(study)[0].intermediate_values[1000], trials(study)[1].intermediate_values[1000]) > \
        tiny.intermediate_values[1000]
    run = Path(tiny.user_attrs["run"])
    log = (run / "caffe.log").read_text()
    assert "Optimization stopped early." in log                  # stopped the Ctrl-C way: SIGINT, snapshot, stop
    assert list((run / "snapshots").glob(f"*_iter_{tiny.user_attrs['iterations']}.solverstate"))
    # The absurdly large lr diverges: the run's watchdog stops it, and the trial counts as pruned.
    assert huge.user_attrs["note"].startswith("diverged") and huge.user_attrs["iterations"] < 20000
    finished = [item for item in seen if isinstance(item, sweep.TrialFinished)]
    assert [item.state for item in finished] == ["COMPLETE", "COMPLETE", "PRUNED", "PRUNED"]
    # The progress bar of the pruned trial ends where caffe stopped, not at max_iter (caffe prints "Optimization
    # Done." after a graceful stop too).
    tiny_items = seen[seen.index(next(i for i in seen if isinstance(i, sweep.TrialStarted) and i.number == 2)):
                      seen.index(finished[2])]
    last = [item for item in tiny_items if isinstance(item, Progress)][-1]
    assert (last.iteration, last.max_iter) == (tiny.user_attrs["iterations"], 20000)
    check_trial_runs(study)


def _caffe_in(run_dir: Path) -> list[int]:
    """The caffe processes working in a run directory (a killed worker leaves its caffe running)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == run_dir:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_a_killed_worker_s_trial_is_failed_by_heartbeat_and_the_study_continues(caffe_install, tmp_path):
    _, solver = write_learnable_classifier(tmp_path / "data", max_iter=1000, test_interval=1000)
    args = ["--solver", str(solver), "--name", "kill", "--trials", "2", "--param", "base_lr=log:1e-3:1e-1",
            "--param", "max_iter=choice:1000,20000", "--try", "base_lr=0.01,max_iter=1000",
            "--try", "base_lr=0.02,max_iter=20000", "--heartbeat", "1", "--no-prune"]
    process = worker(tmp_path, *args)
    long_run = tmp_path / "runs" / "kill" / "trial-0001"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (long_run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    deadline = time.monotonic() + 5    # the worker's caffe dies with it (PR_SET_PDEATHSIG)
    while _caffe_in(long_run) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _caffe_in(long_run) == []
    study = sweep_results.load("kill", None, base=tmp_path)
    assert [t.state.name for t in trials(study)] == ["COMPLETE", "RUNNING"]
    time.sleep(3)                      # past the grace period (2 heartbeats) of the dead worker's trial
    output = finish(worker(tmp_path, *args))
    study = sweep_results.load("kill", None, base=tmp_path)
    states = [t.state.name for t in trials(study)]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"], output
    dead, retry = trials(study)[1], trials(study)[2]
    assert retry.params == dead.params == {"base_lr": 0.02, "max_iter": 20000}   # queued again by the heartbeat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        assert optuna.storages.RetryFailedTrialCallback.retried_trial_number(retry) == 1
    assert long_run.is_dir() and "2 of 2 trials finished in kill" in output


def test_sigterm_stops_the_trial_like_ctrl_c_and_queues_its_values_again(caffe_install, tmp_path):
    _, solver = write_learnable_classifier(tmp_path / "data", max_iter=200000, test_interval=1000)
    process = worker(tmp_path, "--solver", str(solver), "--name", "term", "--trials", "1", "--param",
                     "base_lr=log:1e-3:1e-1", "--no-preflight")
    run = tmp_path / "runs" / "term" / "trial-0000"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 143, output
    assert "run the same command again to continue" in output
    study = sweep_results.load("term", None, base=tmp_path)
    stopped, queued = trials(study)
    assert (stopped.state.name, stopped.user_attrs["note"], queued.state.name) == ("FAIL", "interrupted", "WAITING")
    assert queued.system_attrs["fixed_params"] == stopped.params   # the next run of the command tries them again
    assert stopped.user_attrs["iterations"] < 200000
    assert list((run / "snapshots").glob(f"*_iter_{stopped.user_attrs['iterations']}.solverstate"))
    assert _caffe_in(run) == []                         # caffe snapshotted and exited with its worker


def test_with_metric_loss_best_caffemodel_is_the_snapshot_of_the_lowest_test_loss(caffe_install, tmp_path):
    _, solver = write_learnable_classifier(tmp_path / "data", max_iter=40, test_interval=10)
    options = sweep.SweepOptions(solver=solver, name="loss", space=sweep_space.parse(["base_lr=log:1e-3:1e-1"]),
                                 trials=1, metric="loss", prune=False, enqueue=[{"base_lr": 0.01}])
    result = sweep.run(options, base=tmp_path)
    trial = trials(sweep_results.load("loss", None, base=tmp_path))[0]
    run = Path(trial.user_attrs["run"])
    tests = {r["iteration"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r["phase"] == "test"}
    lowest = min(tests, key=tests.get)
    assert result.best["value"] == trial.value == tests[lowest] and lowest > 0     # minimised
    kept = json.loads((run / sweep_results.METRIC_JSON).read_text())
    assert (kept["iteration"], kept["metric"], kept["value"]) == (lowest, "loss", tests[lowest])
    assert result.best["snapshot"]["iteration"] == lowest
    root = tmp_path / "runs" / "loss"
    assert (root / "best.caffemodel").read_bytes() == (run / sweep_results.METRIC_WEIGHTS).read_bytes()
