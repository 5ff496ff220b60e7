"""The runner's extension points: a per-record callback that stops a run gracefully (a sweep's pruner), and a
RunHook that changes what caffe trains in the run directory and post-processes the snapshots."""
import json
from pathlib import Path

from caffetune.model import prototxt
from caffetune.train import runner
from caffetune.train.logparse import Record
from caffetune.train.watch import Watch

from helpers import save_random_weights, write_tiny_classifier


class _NoMetrics:
    records: list = []

    def write(self, record):
        pass


def test_a_record_callback_asks_once_for_a_graceful_stop():
    solver = prototxt.parse("base_lr: 0.1 max_iter: 100", "SolverParameter")
    seen = []

    def prune_at_first_test(record):
        seen.append(record.iteration)
        return "pruned" if record.phase == "test" else None

    options = runner.RunOptions(solver=Path("s"), keep_best=False, on_record=prune_at_first_test)
    watch = Watch(Path("."), solver, options, _NoMetrics(), lambda item: None, 0)
    watch.on_item(Record("train", 0, {"loss": 2.0}))
    assert watch.pending_action() is None
    watch.on_item(Record("test", 10, {"accuracy": 0.5}))
    assert watch.stop_reason == "pruned"
    assert watch.pending_action() == "stop" and watch.pending_action() is None, "SIGINT is sent once"
    watch.on_item(Record("test", 20, {"accuracy": 0.6}))
    assert seen == [0, 10], "no more calls once a stop is asked for"


def test_a_stopped_run_snapshots_and_says_why(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path / "data", max_iter=2000, test_interval=20)

    def prune(record):
        return "pruned by the test" if record.phase == "test" and record.iteration >= 20 else None

    result = runner.start(runner.RunOptions(solver=solver, name="pruned", runs_root=tmp_path / "runs",
                                            on_record=prune))
    assert result.status == "early-stopped" and result.stop_reason == "pruned by the test"
    assert 20 <= result.iteration < 2000
    assert result.solverstate.is_file() and result.snapshot.is_file(), "caffe snapshots when it stops"
    assert "Optimization stopped early." in (result.run_dir / "caffe.log").read_text()


class _OtherStart:
    """A hook that starts caffe from other weights and marks every snapshot it left."""

    def __init__(self, weights: Path):
        self.weights, self.calls = weights, []

    def before_launch(self, run_dir, prepared, solver, launch, install, callback):
        self.calls.append("before_launch")
        return runner.Launch(launch.solver, [self.weights], {"hook": "other-start"})

    def before_resume(self, run_dir, launch, install, callback):
        self.calls.append("before_resume")
        return launch

    def after_run(self, run_dir, callback):
        self.calls.append("after_run")
        (run_dir / "post-processed").write_text("\n".join(p.name for p in (run_dir / "snapshots").iterdir()))


def test_a_hook_changes_the_launch_and_post_processes(caffe_install, tmp_path):
    net, solver = write_tiny_classifier(tmp_path / "data", max_iter=10, test_interval=10)
    other = save_random_weights(caffe_install, net, tmp_path / "other.caffemodel")
    hook = _OtherStart(other)
    result = runner.start(runner.RunOptions(solver=solver, name="hooked", runs_root=tmp_path / "runs", hook=hook))
    assert result.status == "done" and hook.calls == ["before_launch", "after_run"]
    assert (result.run_dir / "command.txt").read_text().strip().endswith(f"-weights={other}")
    launch = json.loads((result.run_dir / "run.json").read_text())["launches"][0]
    assert launch["hook"] == "other-start"
    assert "snap_iter_10.caffemodel" in (result.run_dir / "post-processed").read_text()
