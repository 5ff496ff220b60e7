"""`caffetune run`: check, prepare the run directory, launch the real `caffe train` in it and watch it.

    result = runner.start(RunOptions(solver=Path("solver.prototxt"), weights=[Path("pretrained.caffemodel")]))
    result = runner.resume("runs/solver-20260101-120000")

The pieces: run_dir (the directory and run.json), launch (the caffe process), watch (the log, best snapshot,
watchdogs). A `RunHook` may change what caffe trains in the run directory (another solver or net, other start
weights) and post-process the snapshots afterwards; `RunOptions.on_record` sees every log record and may ask for a
graceful stop (caffe snapshots and stops, as on Ctrl-C).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import RunError, RunInterrupted
from caffetune.model import caffe_tools, prototxt
from caffetune.model.caffe_tools import CaffeInstall
from caffetune.train import cached_run, launch, plots, preflight
from caffetune.train import run_dir as run_files
from caffetune.train.events import Callback, Notice, Progress, quiet
from caffetune.train.logparse import Record
from caffetune.train.metrics import MetricsWriter
from caffetune.train.run_dir import Prepared, default_name, newest_solverstate, prepare, resolve, snapshot_iteration
from caffetune.train.watch import SATURATED_LOSS, Watch, images_per_loss, is_saturated
from caffetune.transfer import head_fit

# Names other modules (stages, sweep, bench, tests) use from here.
__all__ = ["Callback", "FIT_REPORT", "FITTED_WEIGHTS", "Launch", "Notice", "Prepared", "Progress", "RunHook",
           "RunInterrupted", "RunOptions", "RunResult", "SATURATED_LOSS", "Watch", "default_name",
           "images_per_loss", "is_saturated", "newest_solverstate", "prepare", "resolve", "resume",
           "snapshot_iteration", "start"]

FITTED_WEIGHTS = "fitted-head.caffemodel"   # --fit-head: the pretrained weights with the fitted head(s)
FIT_REPORT = "fit-head.json"                 # --fit-head: what was fitted, on how many images
_quiet = quiet


@dataclass
class Launch:
    """What `caffe train` is started with, in the run directory. A RunHook may change it before the launch."""

    solver: Path                          # the solver file caffe trains
    weights: list[Path] = field(default_factory=list)
    record: dict = field(default_factory=dict)   # extra keys for this launch's entry in run.json


class RunHook(Protocol):
    """Changes what caffe trains in a run directory and post-processes what it wrote (`run --cache-features`)."""

    def before_launch(self, run_dir: Path, prepared: Prepared, solver: Message, launch: Launch,
                      install: CaffeInstall, callback: Callback) -> Launch: ...

    def before_resume(self, run_dir: Path, launch: Launch, install: CaffeInstall, callback: Callback) -> Launch: ...

    def after_run(self, run_dir: Path, callback: Callback) -> None: ...


@dataclass
class RunOptions:
    solver: Path
    weights: list[Path] = field(default_factory=list)
    snapshot: Path | None = None          # a .solverstate to resume from (caffe's -snapshot)
    name: str | None = None
    runs_root: Path = Path("runs")
    gpu: str | None = None                # "0", "0,1" or "all"
    strict_gpu: bool = False
    caffe: str | None = None              # explicit caffe binary (--caffe)
    keep_best: bool = True                # snapshot at every test pass, keep best.caffemodel
    early_stop: int | None = None         # stop after this many test passes without a better accuracy
    watchdog_patience: int = 3            # displays of a loss stuck at 87.3365 before stopping
    images_per_loss: int = 1              # batch x iter_size x average_loss: a saturated loss is k/this x 87.3365
    max_iter: int | None = None           # override the solver's max_iter
    lr_factor: float = 1.0                # multiply the solver's base_lr
    preflight: bool = True
    strict: bool = False                  # preflight warnings (likely mistakes) stop the run like errors
    fit_head: bool = False                # fit the new head(s) on the weights' features first (head_fit)
    # Edits of the copied nets and solver (two-stage fine-tuning freezes layers this way).
    transform_net: Callable[[Message], Message] | None = field(default=None, repr=False)
    # Given every log Record; a non-empty string returned asks caffe to snapshot and stop (a sweep's pruner).
    on_record: Callable[[Record], str | None] | None = field(default=None, repr=False)
    hook: RunHook | None = field(default=None, repr=False)
    # --cache-features: True insists (refuses with the reason), None uses the cache when exact, False never.
    cache_features: bool | None = None
    cache_crops: int = 0                  # --cache-crops K: random TRAIN crops approximated by K per image


@dataclass
class RunResult:
    run_dir: Path
    status: str                           # "done", "interrupted" or "early-stopped"
    iteration: int
    snapshot: Path | None
    solverstate: Path | None
    best: Path | None
    best_accuracy: float | None
    records: list[Record]
    notices: list[Notice]
    stop_reason: str | None = None        # why a graceful stop was asked for (--early-stop, on_record)


# --- the two entry points -----------------------------------------------------------------------------------------
def start(options: RunOptions, callback: Callback = quiet, base: Path | None = None) -> RunResult:
    """Check, prepare runs/<name>/ and train. Raises PreflightError before launching when a check fails."""
    install = caffe_tools.find_caffe(options.caffe)
    prepared = prepare(options, install, base)
    flags, mode, notices = launch.gpu_flags(install, options.gpu, options.strict_gpu, prepared.solver)
    for notice in notices:
        callback(notice)
    run_dir = run_files.new_run_dir(base, options.runs_root, options.name or default_name(options.solver))
    solver = run_files.finalize_solver(prepared, options, run_dir, mode)
    if options.preflight:    # the solver caffe will train (--max-iter, --lr-factor applied), not the user's file
        _check(prepared, install, callback, options.strict, solver)
    options = replace(options, images_per_loss=images_per_loss(prepared.nets.values(), solver))
    run_files.write_run_dir(run_dir, prepared, solver)
    weights = fit_new_heads(run_dir, prepared, options, callback) if options.fit_head else prepared.weights
    plan = Launch(run_dir / run_files.SOLVER_FILE, list(weights))
    if options.hook is None and options.cache_features is not False:
        options = replace(options, hook=cached_run.CacheHook(options.cache_features, options.cache_crops))
    if options.hook is not None:
        plan = options.hook.before_launch(run_dir, prepared, solver, plan, install, callback)
    command = launch.train_command(install, plan.solver, snapshot=prepared.snapshot, weights=plan.weights,
                                   flags=flags)
    return _launch(command, run_dir, install, options, solver, prepared.solver.snapshot, callback,
                   resume_from=None, notices=notices, record=plan.record)


def resume(run_dir: Path | str, callback: Callback = quiet, options: RunOptions | None = None) -> RunResult:
    """Continue a run from its newest .solverstate; the log and the metrics continue where the snapshot was."""
    run_dir = Path(run_dir).resolve()
    saved = run_files.saved_run(run_dir)
    settings = saved["options"]
    options = options or RunOptions(solver=run_dir / run_files.SOLVER_FILE, keep_best=settings.get("keep_best", True),
                                    early_stop=settings.get("early_stop"), gpu=settings.get("gpu"),
                                    caffe=settings.get("caffe"), images_per_loss=settings.get("images_per_loss", 1),
                                    watchdog_patience=settings.get("watchdog_patience", 3))
    install = caffe_tools.find_caffe(options.caffe)
    solver = prototxt.load(run_dir / run_files.SOLVER_FILE, "SolverParameter")
    flags, _mode, notices = launch.gpu_flags(install, options.gpu, options.strict_gpu, solver)
    for notice in notices:
        callback(notice)
    plan = Launch(run_dir / run_files.SOLVER_FILE)
    if options.hook is None:          # a run that trained on cached features resumes its top net
        options = replace(options, hook=cached_run.CacheHook())
    if options.hook is not None:
        plan = options.hook.before_resume(run_dir, plan, install, callback)
    state = newest_solverstate(run_dir)
    command = launch.train_command(install, plan.solver, snapshot=state, flags=flags)
    return _launch(command, run_dir, install, options, solver, int(settings.get("user_snapshot") or 0), callback,
                   resume_from=snapshot_iteration(state), notices=notices, record=plan.record)


# --- the steps ----------------------------------------------------------------------------------------------------
def _check(prepared: Prepared, install: CaffeInstall, callback: Callback, strict: bool, solver: Message) -> None:
    roles = {name: role for role, names in prepared.solver_fields.items() for name in names}
    report = preflight.check(prepared.nets, weights=prepared.weights, snapshot=prepared.snapshot, install=install,
                             roles=roles, solver=solver)
    for line in report.info:
        callback(Notice("info", line))
    if not strict:
        for warning in report.warnings:
            callback(Notice("warning", str(warning)))
    report.raise_for_problems(strict=strict)


def fit_new_heads(run_dir: Path, prepared: Prepared, options: RunOptions, callback: Callback) -> list[Path]:
    """--fit-head: fit the train net's new head(s) on the pretrained features; train from FITTED_WEIGHTS."""
    if len(prepared.weights) != 1 or prepared.snapshot:
        raise RunError("--fit-head needs exactly one pretrained .caffemodel (--weights) and no --snapshot",
                       fix="pass one --weights file, or leave out --fit-head")
    names = prepared.solver_fields.get("train_net") or prepared.solver_fields.get("net")
    if not names:
        raise RunError("--fit-head needs the solver's train net in a file (net: or train_net:)",
                       fix="write the net to a .prototxt and name it in the solver's net: field")
    callback(Notice("info", f"fitting the new head(s) on {prepared.weights[0].name}'s features of the training set"))
    report = head_fit.fit_heads(run_dir / names[0], prepared.weights[0], run_dir / FITTED_WEIGHTS,
                                caffe=options.caffe, check=False)   # preflight has checked these nets already
    files.write_atomic(run_dir / FIT_REPORT, json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    for fit in report.fits:
        callback(Notice("info", f"fitted {fit.name}: {fit.images} images x {fit.features} features, training "
                                f"accuracy {fit.accuracy:.1%}, loss {fit.loss:.4f}"))
    return [run_dir / FITTED_WEIGHTS]


def _launch(command: list[str], run_dir: Path, install: CaffeInstall, options: RunOptions, solver: Message,
            user_snapshot: int, callback: Callback, resume_from: int | None, notices: list[Notice],
            record: dict) -> RunResult:
    quoted = run_files.append_command(run_dir, command)
    callback(Notice("info", f"run directory {run_dir}"))
    callback(Notice("info", quoted))

    def on_started() -> None:
        run_files.record_launch(run_dir, options, install, {"command": command, "resume_from": resume_from,
                                                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                            **record}, user_snapshot)

    with MetricsWriter(run_dir, resume_from=resume_from) as metrics:
        watch = Watch(run_dir, solver, options, metrics, callback, user_snapshot)
        exit_ = launch.run_caffe(command, run_dir, install, watch, resume_from is not None, on_started)
        watch.finish()
        records = list(metrics.records)
    plots.write_png(records, run_dir / "plot.png", title=run_dir.name)
    if watch.tripped is not None:
        raise watch.tripped
    interrupted = exit_.interrupts > 0
    if interrupted and newest_solverstate(run_dir) is None:
        raise RunInterrupted("interrupted before caffe wrote a snapshot: there is nothing to resume",
                             where=str(run_dir), fix="start the run again (with another --name)")
    if exit_.status != 0 and not interrupted:
        raise launch.failure(watch.fatal, exit_.status, run_dir)
    if options.hook is not None:
        options.hook.after_run(run_dir, callback)
    return _result(run_dir, watch, records, notices, interrupted)


def _result(run_dir: Path, watch: Watch, records: list[Record], notices: list[Notice],
            interrupted: bool) -> RunResult:
    state = newest_solverstate(run_dir)
    iteration = snapshot_iteration(state) if state else None
    status = "interrupted" if interrupted else "early-stopped" if watch.stopped_early else "done"
    best = watch.best
    return RunResult(run_dir, status, iteration if state else watch.iteration,
                     run_files.snapshot_weights(run_dir, iteration), state,
                     run_dir / "best.caffemodel" if best else None, best["accuracy"] if best else None,
                     records, notices, watch.stop_reason)
