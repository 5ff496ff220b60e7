"""Launching caffe and watching it: a caffetune killed with SIGKILL takes its caffe with it, the progress of a run
stopped gracefully ends at the iteration caffe reached, the watchdog's divergence has its own error type, and the
run preflights the solver it launches (--max-iter applied)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caffetune.errors import DivergedError, PreflightError, RunError
from caffetune.model import prototxt
from caffetune.train import runner
from caffetune.train.events import Progress
from caffetune.train.logparse import Event, Record

from helpers import write_tiny_classifier


def _processes_in(folder: Path) -> list[int]:
    """The processes whose working directory is `folder` (caffe runs in its run directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == folder:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# A net that trains without printing anything (DummyData, display 0, no test): a caffe whose log pipe is broken
# gets SIGPIPE at its next log line, so only a quiet caffe shows whether it outlives its parent.
QUIET_NET = """name: "quiet"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 8 dim: 1 dim: 8 dim: 8 } shape { dim: 8 }
                     data_filler { type: "gaussian" } data_filler { type: "constant" } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_caffe_dies_with_a_sigkilled_caffetune_run(caffe_install, tmp_path):
    (tmp_path / "net.prototxt").write_text(QUIET_NET)
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\ndisplay: 0\nmax_iter: 100000000\n'
                      'snapshot_prefix: "q"\nsolver_mode: CPU\n')
    run_dir = tmp_path / "runs" / "killed"
    process = subprocess.Popen([sys.executable, "-m", "caffetune", "run", "--solver", str(solver), "--name",
                                "killed", "--no-preflight"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: _processes_in(run_dir), 120)
        time.sleep(2)                            # caffe has built its net and trains, silently
        process.send_signal(signal.SIGKILL)      # no handler runs: only the kernel can end caffe now
        process.wait(timeout=30)
        assert _wait_for(lambda: not _processes_in(run_dir), 5), "caffe outlived the killed caffetune"
    finally:
        process.kill()
        for pid in _processes_in(run_dir):   # never leave a million-iteration caffe behind a failed assertion
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_still_snapshots_and_stops_caffe(caffe_install, tmp_path):
    """The death signal changes nothing while caffetune lives: SIGINT to it stops caffe the graceful way."""
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=1000000, test_interval=100000)
    run_dir = tmp_path / "runs" / "stopped"
    process = subprocess.Popen([sys.executable, "-m", "caffetune", "run", "--solver", str(solver), "--name",
                                "stopped", "--runs-dir", str(tmp_path / "runs"), "--no-preflight"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size,
                     120)                     # caffe is training
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "Optimization stopped early." in (run_dir / "caffe.log").read_text()
    assert list((run_dir / "snapshots").glob("*.solverstate")) and _processes_in(run_dir) == []


class _NoMetrics:
    records: list = []

    def write(self, record):
        pass


def _watch(seen: list, max_iter: int = 1000) -> runner.Watch:
    solver = prototxt.parse(f"base_lr: 0.1 max_iter: {max_iter}", "SolverParameter")
    return runner.Watch(Path("."), solver, runner.RunOptions(solver=Path("s"), keep_best=False), _NoMetrics(),
                        seen.append, 0)


def test_the_progress_of_a_stopped_run_ends_at_the_iteration_reached_not_max_iter():
    # What caffe prints when SIGINT stops it at iteration 237 (display 100): its last snapshot, "stopped early",
    # then caffe.cpp's own "Optimization Done.".
    seen: list = []
    watch = _watch(seen)
    for item in [Record("train", 200, {"loss": 0.5, "lr": 0.1}), Event("snapshot", "snapshots/s_iter_237.caffemodel"),
                 Event("solverstate", "snapshots/s_iter_237.solverstate"), Event("stopped"), Event("done")]:
        watch.on_item(item)
    progress = [item for item in seen if isinstance(item, Progress)]
    assert progress[-1].iteration == 237 and progress[-1].max_iter == 1000
    # A run that ends normally still shows max_iter (caffe prints no line for the last iteration).
    seen.clear()
    watch = _watch(seen)
    for item in [Record("train", 900, {"loss": 0.5, "lr": 0.1}), Event("snapshot", "snapshots/s_iter_1000.caffemodel"),
                 Event("done")]:
        watch.on_item(item)
    assert [item for item in seen if isinstance(item, Progress)][-1].iteration == 1000


def test_the_watchdog_raises_a_diverged_error_with_its_iteration():
    watch = _watch([])
    watch.on_item(Record("train", 40, {"loss": float("nan"), "lr": 0.1}))
    assert isinstance(watch.tripped, DivergedError) and isinstance(watch.tripped, RunError)
    assert watch.tripped.iteration == 40 and "training diverged" in watch.tripped.what


def test_the_run_preflights_the_solver_it_launches(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=20, test_interval=10)
    solver.write_text("\n".join(line for line in solver.read_text().splitlines() if "max_iter" not in line))
    with pytest.raises(PreflightError) as caught:       # max_iter unset: caffe would train 0 iterations
        runner.start(runner.RunOptions(solver=solver, name="unset", runs_root=tmp_path / "runs"))
    assert "max_iter is 0 (unset" in str(caught.value) and "--max-iter N" in str(caught.value)
    assert not (tmp_path / "runs" / "unset").exists()
    # --max-iter is applied before the checks: the same solver with it is fine.
    result = runner.start(runner.RunOptions(solver=solver, name="given", runs_root=tmp_path / "runs", max_iter=10))
    assert result.status == "done" and result.iteration == 10
