"""Watching one launch of caffe: progress, the best accuracy (best.caffemodel), the watchdogs, snapshot pruning.

The watcher is fed parsed log items (`on_item`) and tells the launcher what to do with caffe (`pending_action`):
nothing, "stop" (SIGINT: caffe snapshots and stops, as on Ctrl-C) or "kill" (a diverged net is not worth a
snapshot). Everything it decides comes from its constructor's options and callbacks, nothing is set from outside:
`options.early_stop` and `options.on_record` (a callable given every Record; returning a reason string asks for a
graceful stop, e.g. a sweep's pruner) request stops.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import DivergedError, RunError
from caffetune.model import layers
from caffetune.train import plots
from caffetune.train import run_dir as run_files
from caffetune.train.events import Callback, Progress
from caffetune.train.logparse import Event, Record, main_accuracy

# -log(FLT_MIN): the loss SoftmaxWithLoss prints when the probability of the true class underflows to 0.
SATURATED_LOSS = 87.3365
PLOT_EVERY_S = 60.0   # plot.png is redrawn at a test pass at most this often while caffe runs


def is_saturated(loss: float, images: int = 1) -> bool:
    """Whether a loss is k/images x 87.3365 (k >= 1): k of the images averaged into it have probability 0 for
    their true class. Caffe prints 6 significant digits, hence the tolerance."""
    if not math.isfinite(loss):
        return False
    count = loss / SATURATED_LOSS * images
    return round(count) >= 1 and abs(count - round(count)) < 1e-5 * images


def images_per_loss(nets, solver: Message) -> int:
    """How many images one displayed loss averages: batch_size x iter_size x average_loss (1 when unknown)."""
    for net in nets:
        for layer in layers.all_layers(net):
            params = layers.param_message(layer)
            if "TRAIN" in layers.phases(layer) and params is not None and "batch_size" in \
                    params.DESCRIPTOR.fields_by_name and params.batch_size:
                return params.batch_size * max(solver.iter_size, 1) * max(solver.average_loss, 1)
    return 1


class Watch:
    """State of one launch of caffe, built from the run's solver and options; fed by `on_item`."""

    def __init__(self, run_dir: Path, solver: Message, options, metrics, callback: Callback, user_snapshot: int):
        self.run_dir, self.options, self.metrics, self.callback = run_dir, options, metrics, callback
        self.on_record = getattr(options, "on_record", None)
        self.max_iter, self.base_lr = solver.max_iter, solver.base_lr
        self.user_snapshot = user_snapshot
        self.started = time.monotonic()
        self.first_iteration: int | None = None
        self.iteration = 0
        self.loss = self.lr = self.accuracy = None
        self.best = self._load_best()
        self.stale_tests = 0
        self.saturated = 0
        self.tripped: RunError | None = None
        self.stop_reason: str | None = None     # why a graceful stop was asked for (early stop, a callback)
        self._stop_sent = False
        self.fatal: list[str] = []
        self.stopped_early = self.done = False
        self.snapshotted = 0                    # the highest iteration caffe wrote a snapshot of in this launch
        self.plotted = time.monotonic()

    def _load_best(self) -> dict | None:
        path = self.run_dir / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # --- fed by the launcher --------------------------------------------------------------------------------------
    def on_item(self, item) -> None:
        if isinstance(item, Record):
            self.metrics.write(item)
            self._on_train(item) if item.phase == "train" else self._on_test(item)
            if self.on_record is not None and self.stop_reason is None:
                reason = self.on_record(item)
                if reason:
                    self.stop_reason = str(reason)
        else:
            self._on_event(item)

    def pending_action(self) -> str | None:
        """What the launcher should do to caffe now: "kill", "stop" (once), or None."""
        if self.tripped is not None:
            return "kill"
        if self.stop_reason is not None and not self._stop_sent:
            self._stop_sent = True
            return "stop"
        return None

    def finish(self) -> None:
        """After caffe exits: of the snapshots never ranked, keep only the newest (for --resume)."""
        folder = self.run_dir / run_files.SNAPSHOT_DIR
        if self.options.keep_best and folder.is_dir():
            newest = max((run_files.snapshot_iteration(p) or 0 for p in folder.iterdir()), default=0)
            self._prune(ranked_up_to=newest)

    # --- training and test records --------------------------------------------------------------------------------
    def _on_train(self, record: Record) -> None:
        self.iteration = record.iteration
        self.loss = record.values.get("loss", self.loss)
        self.lr = record.values.get("lr", self.lr)
        if self.first_iteration is None:
            self.first_iteration, self.first_time = record.iteration, time.monotonic()
        self._check_loss(record)
        self._report()

    def _check_loss(self, record: Record) -> None:
        loss = record.values.get("loss")
        if loss is None or self.tripped is not None:
            return
        fix = (f"lower base_lr (it is {self.base_lr:g}; try {self.base_lr / 10:g}), check that the data is scaled "
               "(transform_param scale / mean) and that the labels are right")
        if not math.isfinite(loss):
            self.tripped = DivergedError(f"the loss is {loss} at iteration {record.iteration}: training diverged",
                                         where=str(self.run_dir / "caffe.log"), fix=fix, iteration=record.iteration)
        self.saturated = self.saturated + 1 if is_saturated(loss, self.options.images_per_loss) else 0
        if self.saturated >= self.options.watchdog_patience:
            self.tripped = DivergedError(f"the loss is stuck at multiples of {SATURATED_LOSS} (-log of the smallest "
                                         f"float: the net gives true classes probability 0) for {self.saturated} "
                                         f"displays, up to iteration {record.iteration} (loss {loss:g})",
                                         where=str(self.run_dir / "caffe.log"), fix=fix, iteration=record.iteration)

    def _on_test(self, record: Record) -> None:
        if time.monotonic() - self.plotted > PLOT_EVERY_S:
            plots.write_png(self.metrics.records, self.run_dir / "plot.png", title=self.run_dir.name)
            self.plotted = time.monotonic()
        found = main_accuracy(record.values) if record.net == 0 else None
        if found is None:
            return
        name, value = found
        self.accuracy = value
        if self.options.keep_best:
            self._track_best(record.iteration, name, value)
        self._report()

    def _track_best(self, iteration: int, name: str, value: float) -> None:
        weights = run_files.snapshot_weights(self.run_dir, iteration)
        improved = self.best is None or value > self.best["accuracy"]
        if improved and weights:
            run_files.copy_atomic(weights, self.run_dir / "best.caffemodel")
            self.best = {"iteration": iteration, "accuracy": value, "output": name, "snapshot": weights.name}
            files.write_atomic(self.run_dir / "best.json", json.dumps(self.best, indent=2) + "\n")
            self.stale_tests = 0
        elif not improved:
            self.stale_tests += 1
        self._prune(ranked_up_to=iteration)
        if self.options.early_stop and self.stale_tests >= self.options.early_stop and self.stop_reason is None:
            self.stop_reason = f"no better accuracy in {self.stale_tests} test passes (--early-stop)"

    def _on_event(self, event: Event) -> None:
        if event.kind == "fatal":
            self.fatal.append(event.text)
        elif event.kind in ("snapshot", "solverstate"):
            self.snapshotted = max(self.snapshotted, run_files.snapshot_iteration(Path(event.text)) or 0)
        elif event.kind == "stopped":
            # A graceful stop (SIGINT) snapshots at the iteration reached; caffe prints "Optimization Done." after
            # it too, which must not move the bar to max_iter.
            self.stopped_early = True
            self.iteration = max(self.iteration, self.snapshotted)
            self._report()
        elif event.kind == "done":
            self.done = True
            if not self.stopped_early:
                self.iteration = max(self.iteration, self.max_iter)   # caffe logs no line for the last iteration
            self._report()                                              # when display does not divide max_iter

    def _prune(self, ranked_up_to: int) -> None:
        """With snapshots at every test pass, keep only the best, those the user's interval asked for, and any not
        ranked yet (caffe may be ahead of the log lines read so far; the newest stays for --resume)."""
        folder = self.run_dir / run_files.SNAPSHOT_DIR
        if not folder.is_dir():
            return
        best = self.best["iteration"] if self.best else None
        for path in folder.iterdir():
            iteration = run_files.snapshot_iteration(path)
            if iteration is None or iteration >= ranked_up_to or iteration == best:
                continue
            if not (self.user_snapshot and iteration % self.user_snapshot == 0):
                path.unlink(missing_ok=True)

    def _report(self) -> None:
        elapsed = time.monotonic() - self.started
        eta = None
        if self.first_iteration is not None and self.iteration > self.first_iteration:
            rate = (self.iteration - self.first_iteration) / max(time.monotonic() - self.first_time, 1e-9)
            eta = max(self.max_iter - self.iteration, 0) / rate
        self.callback(Progress(self.iteration, self.max_iter, self.loss, self.lr, self.accuracy, elapsed, eta))
