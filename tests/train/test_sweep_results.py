"""A sweep's results from its study: the JSON and table of --show, sweep.csv, best.json + best.caffemodel of the
best trial, and the two plots (trials recorded in a real SQLite study, no Caffe needed)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from caffetune.errors import SweepError
from caffetune.train import sweep_results, sweep_storage

DISTS = {"base_lr": FloatDistribution(1e-4, 1e-1, log=True), "freeze_through": CategoricalDistribution(("conv1",
                                                                                                      "none"))}
SPACE = ["base_lr=log:0.0001:0.1", "freeze_through=choice:conv1,none"]


def _study(tmp_path: Path, direction: str = "maximize", metric: str = "accuracy") -> optuna.Study:
    root = tmp_path / "runs" / "lr"
    root.mkdir(parents=True)
    storage = sweep_storage.open_storage(f"sqlite:///{root / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="lr", direction=direction)
    study.set_user_attr(sweep_results.CONFIG_ATTR, {"space": SPACE, "metric": metric, "direction": direction})
    return study


def _add(study, root: Path, number: int, state: TrialState, value, lr: float, freeze: str, weights: bytes = b""):
    run = root / f"trial-{number:04d}"
    run.mkdir(parents=True)
    if weights:
        (run / "best.caffemodel").write_bytes(weights)
        (run / "best.json").write_text(json.dumps({"iteration": 20, "accuracy": value}))
    study.add_trial(create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                                 params={"base_lr": lr, "freeze_through": freeze}, distributions=DISTS,
                                 user_attrs={"run": str(run), "iterations": 20 if state != TrialState.PRUNED else 10,
                                             **({"note": "pruned at iteration 10"}
                                                if state == TrialState.PRUNED else {})},
                                 intermediate_values={0: 0.25, 10: value or 0.3}))


def test_json_table_csv_best_and_plots_follow_the_study(tmp_path):
    study = _study(tmp_path)
    root = tmp_path / "runs" / "lr"
    _add(study, root, 0, TrialState.COMPLETE, 0.5, 0.01, "conv1", weights=b"weights-0")
    _add(study, root, 1, TrialState.COMPLETE, 0.875, 0.003, "none", weights=b"weights-1")
    _add(study, root, 2, TrialState.PRUNED, None, 0.09, "none")
    data = sweep_results.as_json(study)
    assert [t["number"] for t in data["trials"]] == [0, 1, 2]
    assert {"number", "state", "params", "value", "run"} <= set(data["trials"][0])
    assert [t["state"] for t in data["trials"]] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert data["best"]["number"] == 1 and data["best"]["value"] == 0.875
    assert data["best"]["params"] == {"base_lr": 0.003, "freeze_through": "none"}
    assert json.loads(json.dumps(data)) == data     # plain JSON

    best = sweep_results.write_outputs(study, root)
    assert best["number"] == 1 and (root / "best.caffemodel").read_bytes() == b"weights-1"
    assert json.loads((root / "best.json").read_text())["snapshot"] == {"iteration": 20, "accuracy": 0.875}
    rows = list(csv.DictReader(io.StringIO((root / "sweep.csv").read_text())))
    assert [(r["trial"], r["state"], r["freeze_through"], r["value"]) for r in rows] == [
        ("0", "COMPLETE", "conv1", "0.5"), ("1", "COMPLETE", "none", "0.875"), ("2", "PRUNED", "none", "")]
    assert rows[2]["note"] == "pruned at iteration 10" and rows[2]["iterations"] == "10"
    for name in ("history.png", "importance.png"):
        assert (root / name).read_bytes()[:4] == b"\x89PNG"
    assert set(sweep_results.importances(study)) == {"base_lr", "freeze_through"}
    header, table = sweep_results.table(study)
    assert header[3] == "best accuracy" and table[1][:4] == ["1", "complete", "base_lr=0.003 freeze_through=none",
                                                              "0.875"]
    assert table[2][1] == "pruned (pruned at iteration 10)"


def test_a_loss_is_minimised_and_one_trial_is_too_few_for_importances(tmp_path):
    study = _study(tmp_path, direction="minimize", metric="loss")
    root = tmp_path / "runs" / "lr"
    _add(study, root, 0, TrialState.COMPLETE, 0.9, 0.01, "conv1", weights=b"a")
    assert sweep_results.importances(study) is None
    _add(study, root, 1, TrialState.COMPLETE, 0.9, 0.05, "none", weights=b"b")
    assert sweep_results.importances(study) is None          # equal values tell the parameters apart no more
    _add(study, root, 2, TrialState.COMPLETE, 0.4, 0.001, "conv1", weights=b"c")
    assert sweep_results.best_trial(study).number == 2
    assert set(sweep_results.importances(study)) == {"base_lr", "freeze_through"}
    sweep_results.write_outputs(study, root)
    assert json.loads((root / "best.json").read_text())["direction"] == "minimize"
    assert (root / "importance.png").read_bytes()[:4] == b"\x89PNG"


def test_a_study_with_nothing_finished_has_no_best_but_still_a_csv(tmp_path):
    study = _study(tmp_path)
    assert sweep_results.write_outputs(study, tmp_path / "runs" / "lr") is None
    assert sweep_results.as_json(study)["best"] is None
    assert (tmp_path / "runs" / "lr" / "sweep.csv").read_text().startswith("trial,state,base_lr,freeze_through,")


def test_show_finds_the_study_by_name_and_refuses_an_unknown_one(tmp_path):
    study = _study(tmp_path)
    _add(study, tmp_path / "runs" / "lr", 0, TrialState.COMPLETE, 0.5, 0.01, "conv1")
    loaded = sweep_results.load("lr", None, Path("runs"), base=tmp_path)
    assert [t.value for t in loaded.get_trials()] == [0.5]
    with pytest.raises(SweepError, match="no sweep other"):
        sweep_results.load("other", None, Path("runs"), base=tmp_path)
    with pytest.raises(SweepError, match="no study named other"):
        sweep_results.load("other", f"sqlite:///{tmp_path / 'runs' / 'lr' / 'study.db'}", base=tmp_path)


def test_a_metric_best_before_training_keeps_the_start_weights(tmp_path):
    """With --metric loss the test at iteration 0 (no snapshot yet) can be the best pass: the weights it scored are
    the ones the run started from, and those are what the trial keeps, not nothing."""
    from caffetune.train import sweep, sweep_space
    from caffetune.train.logparse import Record

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trial = optuna.create_study(direction="minimize").ask()
    start = tmp_path / "start.caffemodel"
    start.write_bytes(b"start weights")
    run = tmp_path / "trial-0000"
    run.mkdir()
    options = sweep.SweepOptions(solver=tmp_path / "solver.prototxt", name="s", trials=1, metric="loss",
                                 space=sweep_space.parse(["base_lr=log:1e-3:1e-1"]), prune=False)
    watch = sweep._TrialWatch(trial, options, "minimize", lambda item: None, run, [start])
    watch.on_record(Record("test", 0, {"loss": 0.5}))
    assert (run / sweep_results.METRIC_WEIGHTS).read_bytes() == b"start weights"
    assert json.loads((run / sweep_results.METRIC_JSON).read_text())["iteration"] == 0
    watch.on_record(Record("test", 10, {"loss": 0.9}))            # worse, and no snapshot: nothing changes
    assert (run / sweep_results.METRIC_WEIGHTS).read_bytes() == b"start weights"
