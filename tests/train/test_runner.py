"""`caffetune run` with the real caffe: run directory, metrics equal to the log, Ctrl-C and --resume,
watchdogs, GPU fallback, best snapshot and early stopping."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caffetune.errors import CaffetuneError, RunError
from caffetune.model import caffe_tools, prototxt
from caffetune.train import metrics, runner
from caffetune.train.logparse import Record

from helpers import write_tiny_classifier


def _log_numbers(log: str) -> tuple[dict[int, float], dict[int, float]]:
    """Train losses and test accuracies read straight from caffe's log, independently of logparse."""
    losses = {int(i): float(v) for i, v in re.findall(r"Iteration (\d+)(?: \([^)]*\))?, loss = (\S+)", log)}
    accuracies, current = {}, None
    for line in log.splitlines():
        if match := re.search(r"Iteration (\d+), Testing net", line):
            current = int(match.group(1))
        elif match := re.search(r"Test net output #\d+: accuracy = (\S+)", line):
            accuracies[current] = float(match.group(1))
    return losses, accuracies


def test_a_run_completes_and_its_metrics_equal_the_log(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=20, test_interval=10)
    seen = []
    result = runner.start(runner.RunOptions(solver=solver, name="first", runs_root=tmp_path / "runs"),
                          callback=seen.append)
    run_dir = tmp_path / "runs" / "first"
    assert result.status == "done" and result.iteration == 20 and result.run_dir == run_dir
    log = (run_dir / "caffe.log").read_text()
    assert "Optimization Done." in log
    losses, accuracies = _log_numbers(log)
    records = metrics.read_records(run_dir)
    assert {r.iteration: r.values["loss"] for r in records if r.phase == "train"} == losses
    assert {r.iteration: r.values["accuracy"] for r in records if r.phase == "test"} == accuracies
    assert sorted(losses) == list(range(21)) and sorted(accuracies) == [0, 10, 20]
    csv_rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + len(records)
    # The run directory holds the copies, the exact command, the plot and the snapshots.
    solver_copy = prototxt.load(run_dir / "solver.prototxt", "SolverParameter")
    assert solver_copy.net == str(run_dir / "train_val.prototxt")
    assert solver_copy.snapshot_prefix == str(run_dir / "snapshots" / "snap")
    assert (run_dir / "command.txt").read_text().strip().endswith(f"train -solver={run_dir / 'solver.prototxt'}")
    assert (run_dir / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "snapshots" / "snap_iter_20.caffemodel").is_file()
    best = json.loads((run_dir / "best.json").read_text())
    assert best["accuracy"] == max(accuracies[10], accuracies[20])
    assert (run_dir / "best.caffemodel").read_bytes() == (
        run_dir / "snapshots" / f"snap_iter_{best['iteration']}.caffemodel").read_bytes()
    progress = [item for item in seen if isinstance(item, runner.Progress)]
    assert progress[-1].iteration == 20 and progress[-1].max_iter == 20
    assert progress[-1].test_accuracy == accuracies[20]


def _caffetune(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "caffetune", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_ctrl_c_snapshots_and_resume_continues_from_that_iteration(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=1500, test_interval=500)
    process = _caffetune("run", "--solver", str(solver), "--name", "long", "--no-best", cwd=tmp_path)
    run_dir = tmp_path / "runs" / "long"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if len(lines) > 20:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    state = runner.newest_solverstate(run_dir)
    stopped_at = runner.snapshot_iteration(state)
    assert 0 < stopped_at < 1500, "interrupted mid-run"
    assert f"interrupted at iteration {stopped_at}" in stdout and f"--resume {run_dir}" in stdout
    assert (run_dir / "snapshots" / f"snap_iter_{stopped_at}.caffemodel").is_file()
    assert "Optimization stopped early." in (run_dir / "caffe.log").read_text()
    before = [r.iteration for r in metrics.read_records(run_dir) if r.phase == "train"]
    assert max(before) == stopped_at - 1

    resumed = _caffetune("run", "--resume", str(run_dir), cwd=tmp_path)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "done at iteration 1500" in stdout
    log = (run_dir / "caffe.log").read_text()
    assert f"Resuming from {state}" in log and log.count("Optimization Done.") >= 1
    train = [r.iteration for r in metrics.read_records(run_dir) if r.phase == "train"]
    assert train == list(range(1501)), "one continuous run: every iteration once, in order"
    losses, _ = _log_numbers(log.split(f"Resuming from {state}")[1])
    assert min(losses) == stopped_at
    commands = (run_dir / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and commands[1].endswith(f"-snapshot={state}")


def test_a_nan_loss_stops_the_run_with_advice(caffe_install, tmp_path):
    net, solver = write_tiny_classifier(tmp_path / "data", max_iter=100000, base_lr=1e12,
                                        extra_solver="random_seed: 3\n")
    net.write_text(net.read_text().replace("scale: 0.00390625", "scale: 1e37"))
    with pytest.raises(RunError) as caught:
        runner.start(runner.RunOptions(solver=solver, name="nan", runs_root=tmp_path / "runs"))
    assert "training diverged" in caught.value.what and "lower base_lr (it is 1e+12; try 1e+11)" in caught.value.fix
    train = [r for r in metrics.read_records(tmp_path / "runs" / "nan") if r.phase == "train"]
    assert train[-1].iteration < 5000, "caffe was stopped long before max_iter"
    assert any(str(r.values["loss"]) == "nan" for r in train)


def test_a_saturated_loss_stops_the_run_with_advice(caffe_install, tmp_path):
    # An absurd base_lr saturates the softmax: the loss is k/8 x 87.3365 (batch 8) from then on.
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=100000, base_lr=1e12,
                                      extra_solver="random_seed: 3\n")
    with pytest.raises(RunError) as caught:
        runner.start(runner.RunOptions(solver=solver, name="stuck", runs_root=tmp_path / "runs"))
    assert "the loss is stuck at multiples of 87.3365" in caught.value.what
    assert "lower base_lr (it is 1e+12; try 1e+11)" in caught.value.fix
    train = [r for r in metrics.read_records(tmp_path / "runs" / "stuck") if r.phase == "train"]
    assert train[-1].iteration < 5000


def test_the_watchdog_needs_consecutive_saturated_losses():
    assert runner.is_saturated(87.3365) and runner.is_saturated(65.5024, images=8)
    assert not runner.is_saturated(65.5024) and not runner.is_saturated(1.38629, images=8)
    solver = prototxt.parse("base_lr: 0.1 max_iter: 100", "SolverParameter")
    options = runner.RunOptions(solver=Path("s"), watchdog_patience=3)
    watch = runner.Watch(Path("."), solver, options, _NoMetrics(), lambda item: None, 0)
    for iteration, loss in enumerate([2.3, 87.3365, 87.3365, 1.0, 87.3365, 87.3365]):
        watch.on_item(Record("train", iteration, {"loss": loss, "lr": 0.1}))
    assert watch.tripped is None, "two in a row is not stuck"
    watch.on_item(Record("train", 6, {"loss": 87.3365, "lr": 0.1}))
    assert "stuck at multiples of 87.3365" in watch.tripped.what and "try 0.01" in watch.tripped.fix


class _NoMetrics:
    def write(self, record):
        pass


def _cuda_build() -> bool:
    try:
        return caffe_tools.find_caffe().is_cuda
    except CaffetuneError:
        return False        # the caffe_install fixture reports the missing build


@pytest.mark.skipif(_cuda_build(), reason="this Caffe has CUDA: there is no CPU fallback to test")
def test_a_gpu_on_a_cpu_only_build_falls_back_with_a_warning(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=2)
    solver.write_text(solver.read_text().replace("solver_mode: CPU", "solver_mode: GPU"))
    with pytest.raises(RunError, match="CPU_ONLY build"):
        runner.start(runner.RunOptions(solver=solver, name="strict", gpu="0", strict_gpu=True,
                                       runs_root=tmp_path / "runs"))
    assert not (tmp_path / "runs" / "strict").exists()
    seen = []
    result = runner.start(runner.RunOptions(solver=solver, name="gpu", gpu="all", runs_root=tmp_path / "runs"),
                          callback=seen.append)
    assert result.status == "done"
    warnings = [n.text for n in seen if isinstance(n, runner.Notice) and n.level == "warning"]
    assert warnings == [f"--gpu all: {caffe_install.binary} is a CPU_ONLY build; training on the CPU instead "
                        "(--strict-gpu makes this an error)"]
    copy = prototxt.load(result.run_dir / "solver.prototxt", "SolverParameter")
    assert copy.solver_mode == 0  # CPU
    assert "-gpu" not in (result.run_dir / "command.txt").read_text()


def test_early_stopping_stops_when_accuracy_no_longer_improves(caffe_install, tmp_path):
    # base_lr 0: the weights never change, so no test pass after the first can be better.
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=100000, test_interval=5, base_lr=0)
    result = runner.start(runner.RunOptions(solver=solver, name="early", early_stop=2, runs_root=tmp_path / "runs"))
    assert result.status == "early-stopped"
    tests = [r.iteration for r in metrics.read_records(result.run_dir) if r.phase == "test"]
    # caffe runs on while the stop travels through the pipe: a few hundred iterations of this tiny net at most.
    assert tests[:4] == [0, 5, 10, 15] and result.iteration < 5000
    assert json.loads((result.run_dir / "best.json").read_text())["iteration"] == 5
    kept = {p.name for p in (result.run_dir / "snapshots").glob("*.caffemodel")}
    assert kept == {"snap_iter_5.caffemodel", f"snap_iter_{result.iteration}.caffemodel"}


def test_an_existing_run_directory_is_not_overwritten(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=1)
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "caffe.log").write_text("old")
    with pytest.raises(RunError, match="exists already") as caught:
        runner.start(runner.RunOptions(solver=solver, name="taken", runs_root=tmp_path / "runs"))
    assert "--resume" in caught.value.fix
    assert (tmp_path / "runs" / "taken" / "caffe.log").read_text() == "old"


def test_a_caffe_failure_names_caffes_own_message(caffe_install, tmp_path):
    net, solver = write_tiny_classifier(tmp_path / "data", max_iter=5)
    net.write_text(net.read_text().replace("train_lmdb", "gone_lmdb"))
    with pytest.raises(RunError) as caught:
        runner.start(runner.RunOptions(solver=solver, name="fails", preflight=False, runs_root=tmp_path / "runs"))
    assert caught.value.what.startswith("caffe train failed: ")
    assert "gone_lmdb" in caught.value.what or "No such file" in caught.value.what
    assert caught.value.where == str(tmp_path / "runs" / "fails" / "caffe.log")
