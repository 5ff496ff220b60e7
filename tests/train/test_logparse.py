"""The caffe log parser (old and new formats, nan/inf), the metrics files and the plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from caffetune.train import logparse, metrics, plots
from caffetune.train.logparse import Event, LogParser, Record

DATA = Path(__file__).resolve().parents[1] / "data" / "logparse"


def _render(item) -> str:
    if isinstance(item, Record):
        return metrics.record_to_json(item)
    return json.dumps({"event": item.kind, "text": item.text})


@pytest.mark.parametrize("name", ["new_format", "old_format", "score_2014"])
def test_logs_parse_to_the_golden_records(name):
    with open(DATA / f"{name}.log") as lines:
        rendered = [_render(item) for item in logparse.parse_stream(lines)]
    assert rendered == (DATA / f"{name}.expected.jsonl").read_text().splitlines()


def test_nan_and_inf_parse_as_floats():
    records = logparse.parse((DATA / "new_format.log").read_text().splitlines())
    by_iteration = {(r.phase, r.iteration): r for r in records}
    assert math.isnan(by_iteration["train", 10].values["loss"])   # printed as -nan
    assert by_iteration["train", 20].values["loss"] == math.inf
    assert logparse.to_float("-inf") == -math.inf and math.isnan(logparse.to_float("nan"))


def test_a_train_record_is_complete_as_soon_as_its_lr_line_arrives():
    parser = LogParser()
    assert parser.feed("I1 solver.cpp:239] Iteration 5 (3 iter/s, 1s/1 iters), loss = 0.5") == []
    assert parser.feed("I1 solver.cpp:258]     Train net output #0: loss = 0.5 (* 1 = 0.5 loss)") == []
    assert parser.feed("I1 sgd_solver.cpp:112] Iteration 5, lr = 0.001") == [
        Record("train", 5, {"loss": 0.5, "lr": 0.001})]


def test_unrelated_lines_do_not_end_a_test_pass():
    lines = ["Iteration 10, Testing net (#0)", "W1 data_layer.cpp:1] some warning",
             "    Test net output #0: accuracy = 0.5", "    Test net output #1: accuracy_top5 = 0.9",
             "Optimization Done."]
    items = list(logparse.parse_stream(lines))
    assert items == [Record("test", 10, {"accuracy": 0.5, "accuracy_top5": 0.9}), Event("done")]


def test_main_accuracy_prefers_top1():
    assert logparse.main_accuracy({"loss": 1.0, "accuracy": 0.5, "top5": 0.9}) == ("accuracy", 0.5)
    assert logparse.main_accuracy({"loss3/top-5": 0.9, "loss3/top-1": 0.6}) == ("loss3/top-1", 0.6)
    assert logparse.main_accuracy({"loss": 1.0}) is None


def test_metrics_round_trip_and_continue_on_resume(tmp_path):
    records = [Record("train", i, {"loss": 1.0 / (i + 1), "lr": 0.1}) for i in range(6)]
    records.append(Record("test", 4, {"accuracy": 0.5, "loss": math.nan}))
    with metrics.MetricsWriter(tmp_path) as sink:
        for record in records:
            sink.write(record)
    assert metrics.read_records(tmp_path)[-1].values["accuracy"] == 0.5
    assert math.isnan(metrics.read_records(tmp_path)[-1].values["loss"])
    # Resuming from the snapshot of iteration 4 drops what came at 4 and after, then continues.
    with metrics.MetricsWriter(tmp_path, resume_from=4) as sink:
        sink.write(Record("train", 4, {"loss": 0.3, "lr": 0.1}))
    kept = metrics.read_records(tmp_path)
    assert [(r.phase, r.iteration) for r in kept] == [("train", i) for i in range(5)]
    assert kept[-1].values["loss"] == 0.3
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "phase,iteration,net,loss,lr"
    assert csv_lines[-1] == "train,4,0,0.3,0.1"


def test_csv_adds_a_column_for_a_new_output():
    text = metrics.csv_text([Record("train", 0, {"loss": 1.0}), Record("test", 0, {"accuracy": 0.25})])
    assert text.splitlines() == ["phase,iteration,net,loss,accuracy", "train,0,0,1.0,", "test,0,0,,0.25"]


def test_plot_writes_a_png_from_any_log(tmp_path):
    records = logparse.parse((DATA / "old_format.log").read_text().splitlines())
    png = plots.write_png(records, tmp_path / "plot.png", title="old")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    xs, ys = plots.series(records, "test", "accuracy")
    assert xs == [0, 200] and ys == [0.0868, 0.9718]
    xs, _ = plots.series(records, "train", "loss")
    assert xs == [0, 100]  # the inf loss at 200 is not drawn


def test_plot_command_draws_any_caffe_log(tmp_path):
    from click.testing import CliRunner

    from caffetune.cli import cli

    result = CliRunner().invoke(cli, ["plot", str(DATA / "new_format.log"), "-o", str(tmp_path / "curves.png")])
    assert result.exit_code == 0, result.output
    assert "3 train and 2 test records" in result.output
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.log"
    empty.write_text("nothing to see\n")
    result = CliRunner().invoke(cli, ["plot", str(empty)])
    assert result.exit_code == 1 and "no iteration, loss or test lines" in str(result.exception)
