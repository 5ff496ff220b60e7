"""`caffetune sweep`: a hyperparameter search over real fine-tuning runs, on Optuna.

    runs/<name>/
      study.db                    the Optuna study (default storage: sqlite:///runs/<name>/study.db)
      trial-NNNN/                 one ordinary `caffetune run` directory per trial (nets, solver, caffe.log, ...)
      sweep.csv, best.json,       written by sweep_results after every trial: the table, the best trial and
      best.caffemodel             its weights
      history.png, importance.png the optimisation history and the parameter importances

The study is the engine: several processes (on one machine or many, with a PostgreSQL storage) that run the same
sweep share it, and each stops once the study holds `trials` finished trials (complete, pruned, or failed with an
error of their own). Each process records a heartbeat for its running trial; a trial whose process died is marked
failed by the next process to look, and its parameters are queued again, so running the same command again
continues the sweep.

Each test pass of a trial is reported to Optuna; with pruning (median pruner) a hopeless trial is stopped the way
Ctrl-C stops a run (caffe snapshots and stops) and keeps its run directory. A trial whose loss diverges (the run's
watchdog) counts as pruned too.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from caffetune import files
from caffetune.errors import DivergedError, RunError, SweepError
from caffetune.model import caffe_tools, prototxt
from caffetune.train import cached_run, preflight, runner, sweep_results, sweep_space
from caffetune.train import run_dir as run_files
from caffetune.train.logparse import Record, main_accuracy
from caffetune.train.sweep_space import SearchSpace
from caffetune.train.sweep_storage import ERROR_ATTR, counts, open_storage, open_study, storage_url
from caffetune.transfer import top_net

MAIN_ACCURACY = "accuracy"           # the default metric: the run's main accuracy (as best.caffemodel ranks)


class SweepInterrupted(SweepError):
    """Ctrl-C during a sweep: the running trial was snapshotted and stopped, its parameters queued again."""

    exit_code = 130


@dataclass
class SweepOptions:
    solver: Path
    name: str
    space: SearchSpace
    trials: int                                   # the study's total, shared by every process of the sweep
    weights: list[Path] = field(default_factory=list)
    storage: str | None = None                    # default: sqlite:///<runs_root>/<name>/study.db
    runs_root: Path = Path("runs")
    metric: str = MAIN_ACCURACY                   # a test output of the net (e.g. loss), or the main accuracy
    direction: str | None = None                  # maximize / minimize; default: minimize a loss, else maximize
    prune: bool = True
    prune_startup: int = 3                        # finished trials before the pruner prunes anything
    prune_warmup: int = 0                         # iterations of a trial before it can be pruned
    seed: int | None = None
    heartbeat: int = 60                           # seconds between heartbeats of a running trial
    grace: int | None = None                      # seconds without heartbeat before a trial is failed (2 x)
    enqueue: list[dict] = field(default_factory=list)   # trials to run first, with these values
    gpu: str | None = None
    strict_gpu: bool = False
    caffe: str | None = None
    early_stop: int | None = None
    fit_head: bool = False
    cache_features: bool | None = None            # as `run`: None uses the feature cache when it is exact
    preflight: bool = True


@dataclass(frozen=True)
class TrialStarted:
    number: int
    values: dict
    run_dir: Path


@dataclass(frozen=True)
class TrialFinished:
    number: int
    state: str                                    # COMPLETE, PRUNED or FAIL
    value: float | None
    iterations: int | None
    run_dir: Path
    note: str = ""


@dataclass
class SweepResult:
    root: Path
    storage: str
    ran: list[int]                                # trial numbers this process ran
    finished: int                                 # finished trials in the study when it stopped
    best: dict | None
    running: int = 0                              # trials other workers were running when it stopped


def direction_of(metric: str, direction: str | None = None) -> str:
    if direction is not None:
        if direction not in ("maximize", "minimize"):
            raise SweepError(f"--direction {direction}: expected maximize or minimize", fix="--direction minimize")
        return direction
    return "minimize" if "loss" in metric.lower() else "maximize"


def metric_value(values: dict[str, float], metric: str) -> float | None:
    """The metric of one test pass: the main accuracy, or the output of that name."""
    if metric == MAIN_ACCURACY:
        found = main_accuracy(values)
        return found[1] if found else None
    return values.get(metric)


def check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or name.startswith("."):
        raise SweepError(f"--name {name!r}: a sweep's name is one folder name", fix="e.g. --name flowers-lr")
    return name


@dataclass
class _Base:
    """What every trial starts from: the solver (net paths absolute), its nets, the weights."""

    solver: object
    nets: dict
    weights: list[Path]


def prepare_base(options: SweepOptions, base: Path, callback: Callable) -> _Base:
    """Read the sweep's solver and nets once, check the space against them and preflight them (once)."""
    install = caffe_tools.find_caffe(options.caffe)
    prepared = runner.prepare(runner.RunOptions(solver=options.solver, weights=list(options.weights)), install,
                              base)
    sweep_space.check_solver(prepared.solver, options.space)
    sweep_space.check_nets(prepared.nets, options.space)
    if options.preflight:
        roles = {name: role for role, names in prepared.solver_fields.items() for name in names}
        checked = sweep_space.preflight_solver(prepared.solver, options.space,
                                               options.enqueue[0] if options.enqueue else None)
        report = preflight.check(prepared.nets, weights=prepared.weights, install=install, roles=roles,
                                 solver=checked)     # the solver checks run here, once for the sweep
        for line in report.info:
            callback(runner.Notice("info", line))
        for warning in report.warnings:
            callback(runner.Notice("warning", str(warning)))
        report.raise_for_problems()
    solver = type(prepared.solver)()
    solver.CopyFrom(prepared.solver)
    for field_name, names in prepared.solver_fields.items():
        paths = [str(prepared.source_paths[name].resolve()) for name in names]
        if field_name == "test_net":
            solver.test_net[:] = paths
        else:
            setattr(solver, field_name, paths[0])
    return _Base(solver, prepared.nets, prepared.weights)


class _TrialWatch:
    """One trial's view of its run: `on_record` (the runner's RunOptions.on_record) reports every test pass to
    Optuna and returns a reason to stop when the pruner says so; as the run's callback it passes everything on."""

    def __init__(self, trial: optuna.Trial, options: SweepOptions, direction: str, callback: Callable,
                 run_dir: Path | None = None, start: list[Path] | None = None):
        self.trial, self.options, self.callback, self.run_dir = trial, options, callback, run_dir
        self.start = start or []                  # the -weights the run starts from
        self.sign = 1.0 if direction == "maximize" else -1.0
        self.best: float | None = None
        self.best_iteration: int | None = None
        self.pruned_at: int | None = None
        self.iteration = 0
        self.reported: set[int] = set()

    def __call__(self, item) -> None:
        self.callback(item)

    def on_record(self, record: Record) -> str | None:
        self.iteration = max(self.iteration, record.iteration)
        if record.phase == "train":
            return None
        value = metric_value(record.values, self.options.metric) if record.net == 0 else None
        if value is None or not math.isfinite(value):
            return None
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.best_iteration = value, record.iteration
            self._keep_snapshot(record.iteration, value)
        if record.iteration in self.reported:
            return None           # Optuna takes one value per step
        self.reported.add(record.iteration)
        self.trial.report(value, step=record.iteration)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = record.iteration
            return f"pruned: {self.options.metric} {value:g} at iteration {record.iteration} is below the " \
                   f"median of the earlier trials"
        return None


    def _keep_snapshot(self, iteration: int, value: float) -> None:
        """Another --metric than the main accuracy: keep the snapshot of this test pass, the best by the metric, as
        METRIC_WEIGHTS (the run's best.caffemodel is ranked by accuracy, and the run prunes the other snapshots).
        The run snapshots at every test pass; the snapshot of iteration N is written before the test at N."""
        if self.options.metric == MAIN_ACCURACY or self.run_dir is None:
            return
        weights = run_files.snapshot_weights(self.run_dir, iteration)
        if weights is None and iteration == 0:   # the test before training scores the weights the run starts from
            weights = self._start_weights()
        if weights is None:      # no snapshot of this pass: keep no older, worse one
            for name in (sweep_results.METRIC_WEIGHTS, sweep_results.METRIC_JSON):
                (self.run_dir / name).unlink(missing_ok=True)
            return
        run_files.copy_atomic(weights, self.run_dir / sweep_results.METRIC_WEIGHTS)   # cached runs: made whole later
        files.write_atomic(self.run_dir / sweep_results.METRIC_JSON, json.dumps(
            {"iteration": iteration, "metric": self.options.metric, "value": value, "snapshot": weights.name},
            indent=2) + "\n")


    def _start_weights(self) -> Path | None:
        """The weights iteration 0 is tested with: the fitted head (--fit-head), else the one -weights file."""
        fitted = self.run_dir / runner.FITTED_WEIGHTS
        if fitted.is_file():
            return fitted
        return Path(self.start[0]) if len(self.start) == 1 else None


class _Objective:
    def __init__(self, options: SweepOptions, root: Path, base_run: _Base, base: Path, direction: str,
                 callback: Callable):
        self.options, self.root, self.base_run, self.base = options, root, base_run, base
        self.direction, self.callback = direction, callback
        self.ran: list[int] = []

    def __call__(self, trial: optuna.Trial) -> float:
        if not within_total(trial, self.options.trials):
            self._not_run(trial)
        values = self.options.space.suggest(trial)
        run_dir = self.root / f"trial-{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        self.ran.append(trial.number)
        self.callback(TrialStarted(trial.number, values, run_dir))
        watch = _TrialWatch(trial, self.options, self.direction, self.callback, run_dir, self.base_run.weights)
        started = time.monotonic()
        try:
            result = self._run(trial.number, values, watch)
        except RunError as error:
            return self._failed(trial, values, watch, run_dir, error)
        finally:
            trial.set_user_attr("seconds", round(time.monotonic() - started, 1))
        return self._finished(trial, values, watch, result)

    def _not_run(self, trial: optuna.Trial) -> None:
        """Another worker took the study's last trial at the same moment: give this one back (its queued values
        go back in the queue), record it as failed without an error (it does not count) and stop this worker."""
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        fixed = frozen.system_attrs.get("fixed_params")
        if fixed:
            trial.study.enqueue_trial(fixed)
        trial.set_user_attr("note", NOT_RUN)
        trial.study.stop()
        raise TotalReached(f"trial {trial.number} not run: {NOT_RUN}")

    def _run(self, number: int, values: dict, watch: _TrialWatch) -> runner.RunResult:
        staged = self.root / f".trial-{number:04d}.solver.prototxt"   # until the run directory has its copy
        files.write_atomic(staged, prototxt.format(sweep_space.apply_solver(self.base_run.solver, values)))
        options = runner.RunOptions(
            solver=staged, weights=list(self.base_run.weights), name=f"trial-{number:04d}", runs_root=self.root,
            gpu=self.options.gpu, strict_gpu=self.options.strict_gpu, caffe=self.options.caffe,
            early_stop=self.options.early_stop, preflight=False,
            fit_head=values.get("fit_head", self.options.fit_head),
            transform_net=sweep_space.net_transform(values), on_record=watch.on_record)
        options = _with_cache_features(options, values, self.options.cache_features)
        try:
            result = runner.start(options, callback=watch, base=self.base)
        finally:
            staged.unlink(missing_ok=True)
        _full_net_metric_weights(result.run_dir)
        return result

    def _failed(self, trial: optuna.Trial, values: dict, watch: _TrialWatch, run_dir: Path,
                error: RunError) -> float:
        trial.set_user_attr("iterations", watch.iteration)
        if isinstance(error, runner.RunInterrupted) or getattr(error, "exit_code", 1) == 130:
            self._requeue(trial, values)
            raise SweepInterrupted(f"interrupted during trial {trial.number}", where=str(run_dir),
                                   fix="run the same command again to continue the sweep") from None
        if isinstance(error, DivergedError):       # the run's watchdog: NaN loss, or stuck at -log(FLT_MIN)
            note = f"diverged at iteration {error.iteration or watch.iteration}: {error.what}"
            trial.set_user_attr("note", note)
            self.callback(TrialFinished(trial.number, "PRUNED", watch.best, watch.iteration, run_dir, note))
            raise optuna.TrialPruned(note)
        trial.set_user_attr(ERROR_ATTR, str(error))
        self.callback(TrialFinished(trial.number, "FAIL", None, watch.iteration, run_dir, error.what))
        raise error

    def _finished(self, trial: optuna.Trial, values: dict, watch: _TrialWatch, result: runner.RunResult) -> float:
        trial.set_user_attr("iterations", result.iteration)
        if watch.best_iteration is not None:
            trial.set_user_attr("best_iteration", watch.best_iteration)
        if result.status == "interrupted" and watch.pruned_at is None:
            self._requeue(trial, values)
            raise SweepInterrupted(f"interrupted during trial {trial.number}", where=str(result.run_dir),
                                   fix="run the same command again to continue the sweep")
        if watch.pruned_at is not None:
            note = f"pruned at iteration {watch.pruned_at}"
            trial.set_user_attr("note", note)
            self.callback(TrialFinished(trial.number, "PRUNED", watch.best, result.iteration, result.run_dir,
                                        note))
            raise optuna.TrialPruned(note)
        if watch.best is None:
            raise SweepError(f"trial {trial.number}: no test pass reported {self.options.metric}",
                             where=str(result.run_dir / "caffe.log"),
                             fix="give the solver a test phase (test_iter, test_interval), or pick --metric "
                                 "among the test outputs in metrics.csv")
        self.callback(TrialFinished(trial.number, "COMPLETE", watch.best, result.iteration, result.run_dir))
        return watch.best

    def _requeue(self, trial: optuna.Trial, values: dict) -> None:
        trial.set_user_attr("note", "interrupted")
        trial.study.enqueue_trial(values)


def _full_net_metric_weights(run_dir: Path) -> None:
    """A trial trained on cached features snapshots the top net only: its best-metric.caffemodel gets the frozen
    trunk back, as the run's hook does for its snapshots and best.caffemodel."""
    path = run_dir / sweep_results.METRIC_WEIGHTS
    cached = cached_run.load(run_dir) if path.is_file() else None
    if cached is not None and top_net.is_top_only(path, cached.cut):
        top_net.assemble(cached.original_weights, cached.full_net, path, path, cached.cut)


def _with_cache_features(options: runner.RunOptions, values: dict, default: bool | None) -> runner.RunOptions:
    """The trial's cache_features value, else the sweep's (None: the run decides, as `caffetune run` does)."""
    chosen = values.get("cache_features", default)
    if chosen is None:
        return options
    if "cache_features" not in runner.RunOptions.__dataclass_fields__:
        raise SweepError("--param cache_features: `caffetune run` has no feature cache option",
                         fix="leave out cache_features")
    return replace(options, cache_features=chosen)


NOT_RUN = "not run: the study's total was reached by the other workers' trials"


class TotalReached(SweepError):
    """A trial asked for when the study's finished and running trials already make its total (it is not run)."""


def within_total(trial: optuna.Trial, total: int) -> bool:
    """Whether a trial just asked for fits the study's total: the finished trials, plus the running ones ahead of
    it (lower numbers), leave a place. Numbers are given in the order trials are created in the storage, so of
    two workers that ask at once for the last place, the later one sees the earlier one's trial ahead of it."""
    trials = trial.study.get_trials(deepcopy=False)
    finished, _ = counts(trial.study, trials)
    ahead = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < trial.number)
    return finished + ahead < total


class _Budget:
    """Optuna callback after each trial: update the sweep's files, fail stale trials, stop at the total."""

    def __init__(self, options: SweepOptions, root: Path):
        self.options, self.root = options, root

    def __call__(self, study: optuna.Study, _trial) -> None:
        sweep_results.write_outputs(study, self.root, plots=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        finished, running = counts(study)
        if finished + running >= self.options.trials:   # the others' running trials will finish the total
            study.stop()


def run(options: SweepOptions, callback: Callable = lambda item: None, base: Path | None = None) -> SweepResult:
    """Run trials of the sweep until the study holds `options.trials` finished trials."""
    base = (base or Path.cwd()).resolve()
    check_name(options.name)
    if options.trials < 1:
        raise SweepError(f"--trials {options.trials}: need at least one trial", fix="--trials 20")
    direction = direction_of(options.metric, options.direction)
    root = base / options.runs_root / options.name
    root.mkdir(parents=True, exist_ok=True)
    url = storage_url(options, base)
    storage = open_storage(url, options.heartbeat, options.grace)
    study = open_study(options, storage, direction)
    if not study.get_trials(deepcopy=False) and any(root.glob("trial-*")):
        raise SweepError(f"{root} holds trial directories of another study, and the study {options.name} has no "
                         "trial", where=str(root), fix="pick another --name, or move the old folder away")
    base_run = prepare_base(options, base, callback)
    objective = _Objective(options, root, base_run, base, direction, callback)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if sum(counts(study)) < options.trials:     # the others' running trials will finish the total
        study.optimize(objective, callbacks=[_Budget(options, root)], catch=(RunError, TotalReached))
    best = sweep_results.write_outputs(study, root, plots=True)
    finished, running = counts(study)
    return SweepResult(root, url, objective.ran, finished, best, running)

