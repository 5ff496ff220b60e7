"""`caffetune run`: a run directory, the real `caffe train` launched in it, watched line by line.

    runs/<name>/
      solver.prototxt, <net>.prototxt   copies (paths made absolute, snapshot_prefix and solver_mode set)
      command.txt, run.json             the exact command(s) and every option, for reproducing the run
      caffe.log                         caffe's full output (a resumed run appends to it)
      metrics.csv, metrics.jsonl        every display and test pass (a resumed run continues them)
      plot.png                          loss / accuracy / lr against iterations (redrawn every minute)
      snapshots/                        caffe's .caffemodel and .solverstate files
      best.caffemodel, best.json        the snapshot with the best validation accuracy

Ctrl-C is forwarded to caffe as SIGINT (caffe's default -sigint_effect=stop snapshots and stops cleanly); a second
Ctrl-C kills it. `resume(run_dir)` continues from the newest .solverstate with the same iteration count.
"""
from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from google.protobuf.message import Message

from caffetune import files
from caffetune import __version__
from caffetune.model import caffe_tools
from caffetune.transfer import head_fit
from caffetune.model import layers
from caffetune.train import plots
from caffetune.train import preflight
from caffetune.model import prototxt
from caffetune.model.caffe_tools import CaffeInstall
from caffetune.errors import RunError, RunInterrupted
from caffetune.train.logparse import Event, LogParser, Record, main_accuracy
from caffetune.train.metrics import MetricsWriter

# -log(FLT_MIN): the loss SoftmaxWithLoss prints when the probability of the true class underflows to 0.
SATURATED_LOSS = 87.3365
PATH_FIELDS = ("source", "mean_file", "root_folder")
SNAPSHOT_DIR = "snapshots"
FITTED_WEIGHTS = "fitted-head.caffemodel"   # --fit-head: the pretrained weights with the fitted head(s)
FIT_REPORT = "fit-head.json"                 # --fit-head: what was fitted, on how many images
PLOT_EVERY_S = 60.0   # plot.png is redrawn at a test pass at most this often while caffe runs
_ITER_FILE = re.compile(r"_iter_(\d+)\.(caffemodel|solverstate)(\.h5)?$")


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


@dataclass(frozen=True)
class Notice:
    """A message for the user (the CLI prints it): level is "info" or "warning"."""

    level: str
    text: str


@dataclass(frozen=True)
class Progress:
    iteration: int
    max_iter: int
    loss: float | None
    lr: float | None
    test_accuracy: float | None
    elapsed: float
    eta: float | None


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
    fit_head: bool = False                # fit the new head(s) on the weights' features first (headfit)
    # Edits of the copied nets and solver (two-stage fine-tuning freezes layers this way).
    transform_net: Callable[[Message], Message] | None = field(default=None, repr=False)


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


Callback = Callable[[object], None]


def _quiet(_item) -> None:
    pass


# --- preparing the run directory ---------------------------------------------------------------------------------
def resolve(path: str, base: Path) -> Path:
    """A path as caffe resolves it: relative to the directory caffe is started from."""
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (base / candidate)


def absolutize_paths(message: Message, base: Path) -> Message:
    """A copy of a net whose data sources, mean files and image roots are absolute (caffe runs in the run dir)."""
    result = type(message)()
    result.CopyFrom(message)
    _absolutize_in_place(result, base)
    return result


def _absolutize_in_place(message: Message, base: Path) -> None:
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None:
            values = value if descriptor.label == descriptor.LABEL_REPEATED else [value]
            for item in values:
                _absolutize_in_place(item, base)
        elif descriptor.name in PATH_FIELDS and isinstance(value, str) and value:
            trailing = "/" if value.endswith("/") else ""
            setattr(message, descriptor.name, str(resolve(value, base)) + trailing)


@dataclass
class Prepared:
    """The solver and nets of a run, in memory, ready to check and to write."""

    solver: Message
    nets: dict[str, Message]              # file name in the run dir -> net
    solver_fields: dict[str, list[str]]   # solver field -> file names (net, train_net, test_net)
    weights: list[Path]
    snapshot: Path | None
    notices: list[Notice]
    source_paths: dict[str, Path] = field(default_factory=dict)   # file name -> the user's original file


def _net_files(solver: Message, base: Path, solver_dir: Path) -> list[tuple[str, Path]]:
    """(solver field, path) of every net file the solver names; caffe resolves them from its working directory."""
    found = []
    for name in ("net", "train_net"):
        if solver.HasField(name):
            found.append((name, getattr(solver, name)))
    found += [("test_net", path) for path in solver.test_net]
    result = []
    for field_name, path in found:
        resolved = resolve(path, base)
        if not resolved.is_file() and resolve(path, solver_dir).is_file():
            resolved = resolve(path, solver_dir)  # a path written relative to the solver's own folder
        result.append((field_name, resolved))
    return result


def _unique_name(path: Path, taken: set[str]) -> str:
    name, index = path.name, 1
    while name in taken:
        index += 1
        name = f"{path.stem}-{index}{path.suffix}"
    taken.add(name)
    return name


def prepare(options: RunOptions, install: CaffeInstall, base: Path | None = None) -> Prepared:
    """Read the solver and its nets, make every path absolute, apply the options (gpu, max_iter, lr, snapshots)."""
    base = (base or Path.cwd()).resolve()
    solver_path = resolve(str(options.solver), base)
    solver = prototxt.load(solver_path, "SolverParameter")
    notices: list[Notice] = []
    nets, fields, sources, taken = {}, {}, {}, {"solver.prototxt"}
    for field_name, path in _net_files(solver, base, solver_path.parent):
        net = absolutize_paths(prototxt.load(path), base)
        name = _unique_name(path, taken)
        nets[name] = options.transform_net(net) if options.transform_net else net
        fields.setdefault(field_name, []).append(name)
        sources[name] = path
    for inline in ("net_param", "train_net_param"):
        if solver.HasField(inline):
            net = absolutize_paths(getattr(solver, inline), base)
            getattr(solver, inline).CopyFrom(options.transform_net(net) if options.transform_net else net)
    weights = [resolve(str(w), base) for w in options.weights]
    snapshot = resolve(str(options.snapshot), base) if options.snapshot else None
    return Prepared(solver, nets, fields, weights, snapshot, notices, sources)


def gpu_flags(install: CaffeInstall, gpu: str | None, strict: bool, solver: Message) -> tuple[list[str], str,
                                                                                              list[Notice]]:
    """caffe's -gpu flag and the solver_mode to write. A GPU on a CPU_ONLY build falls back to CPU (or fails)."""
    solver_mode = solver.DESCRIPTOR.fields_by_name["solver_mode"].enum_type.values_by_number[solver.solver_mode].name
    if gpu is not None:
        if install.is_cuda:
            return [f"-gpu={gpu}"], "GPU", []
        if strict:
            raise RunError(f"--gpu {gpu} asked for, but {install.binary} is a CPU_ONLY build",
                           fix="build Caffe with CUDA (CAFFE_CUDA=1 make caffe), or drop --gpu / --strict-gpu")
        return [], "CPU", [Notice("warning", f"--gpu {gpu}: {install.binary} is a CPU_ONLY build; training on the "
                                             "CPU instead (--strict-gpu makes this an error)")]
    if solver_mode == "GPU" and not install.is_cuda:
        return [], "CPU", [Notice("warning", "the solver asks for solver_mode: GPU but this Caffe is a CPU_ONLY "
                                             "build; training on the CPU")]
    return [], solver_mode, []


def _snapshot_interval(solver: Message, keep_best: bool) -> int:
    """Snapshot at every test pass when keeping the best (test at N happens right after snapshot N)."""
    if not keep_best or not solver.test_interval or not len(solver.test_iter):
        return solver.snapshot
    return math.gcd(solver.snapshot, solver.test_interval) if solver.snapshot else solver.test_interval


def finalize_solver(prepared: Prepared, options: RunOptions, run_dir: Path, mode: str) -> Message:
    """The solver as written into the run directory: net paths, snapshot_prefix, solver_mode, overrides."""
    solver = type(prepared.solver)()
    solver.CopyFrom(prepared.solver)
    for field_name, names in prepared.solver_fields.items():
        paths = [str(run_dir / name) for name in names]
        if field_name == "test_net":
            solver.test_net[:] = paths
        else:
            setattr(solver, field_name, paths[0])
    prefix = Path(solver.snapshot_prefix).name if solver.snapshot_prefix else "snapshot"
    solver.snapshot_prefix = str(run_dir / SNAPSHOT_DIR / prefix)
    solver.solver_mode = solver.DESCRIPTOR.fields_by_name["solver_mode"].enum_type.values_by_name[mode].number
    solver.snapshot = _snapshot_interval(solver, options.keep_best)
    if options.max_iter is not None:
        solver.max_iter = options.max_iter
    if options.lr_factor != 1.0:
        solver.base_lr = solver.base_lr * options.lr_factor
    return solver


def default_name(solver: Path) -> str:
    return f"{Path(solver).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def write_run_dir(run_dir: Path, prepared: Prepared, solver: Message) -> None:
    (run_dir / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
    for name, net in prepared.nets.items():
        files.write_atomic(run_dir / name, prototxt.format(net))
    files.write_atomic(run_dir / "solver.prototxt", prototxt.format(solver))


def _record_json(run_dir: Path, options: RunOptions, install: CaffeInstall, extra: dict) -> None:
    path = run_dir / "run.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("launches", [])
    settings = {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                for k, v in asdict(options).items() if k != "transform_net"}
    data.update({"caffetune": __version__, "caffe": str(install.binary), "caffe_version": install.version,
                 "options": data.get("options", settings)})
    data["launches"].append(extra)
    files.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- snapshots ----------------------------------------------------------------------------------------------------
def snapshot_iteration(path: Path) -> int | None:
    match = _ITER_FILE.search(path.name)
    return int(match.group(1)) if match else None


def newest_solverstate(run_dir: Path) -> Path | None:
    """The .solverstate of the highest iteration in a run directory's snapshots (None when there is none)."""
    states = [p for p in (Path(run_dir) / SNAPSHOT_DIR).glob("*_iter_*.solverstate*") if snapshot_iteration(p)]
    return max(states, key=snapshot_iteration, default=None)


def _snapshot_pair(run_dir: Path, iteration: int) -> list[Path]:
    return [p for p in (run_dir / SNAPSHOT_DIR).glob(f"*_iter_{iteration}.*") if snapshot_iteration(p) == iteration]


def _copy_atomic(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, files.atomic_output(target) as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)


# --- watching caffe -----------------------------------------------------------------------------------------------
class Watch:
    """State of one launch of caffe: progress, best accuracy, the watchdogs, snapshot pruning."""

    def __init__(self, run_dir: Path, solver: Message, options: RunOptions, metrics: MetricsWriter,
                 callback: Callback, user_snapshot: int):
        self.run_dir, self.options, self.metrics, self.callback = run_dir, options, metrics, callback
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
        self.stop_requested = False
        self.last_snapshot: Path | None = None
        self.last_state: Path | None = None
        self.fatal: list[str] = []
        self.stopped_early = self.done = False
        self.interrupts = 0
        self.stop_sent = False
        self.plotted = time.monotonic()

    def _load_best(self) -> dict | None:
        path = self.run_dir / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def on_item(self, item) -> None:
        if isinstance(item, Record):
            self.metrics.write(item)
            self._on_train(item) if item.phase == "train" else self._on_test(item)
        else:
            self._on_event(item)

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
            self.tripped = RunError(f"the loss is {loss} at iteration {record.iteration}: training diverged",
                                    where=str(self.run_dir / "caffe.log"), fix=fix)
        self.saturated = self.saturated + 1 if is_saturated(loss, self.options.images_per_loss) else 0
        if self.saturated >= self.options.watchdog_patience:
            self.tripped = RunError(f"the loss is stuck at multiples of {SATURATED_LOSS} (-log of the smallest float: "
                                    f"the net gives true classes probability 0) for {self.saturated} displays, up "
                                    f"to iteration {record.iteration} (loss {loss:g})",
                                    where=str(self.run_dir / "caffe.log"), fix=fix)

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
        weights = [p for p in _snapshot_pair(self.run_dir, iteration) if ".caffemodel" in p.name]
        improved = self.best is None or value > self.best["accuracy"]
        if improved and weights:
            _copy_atomic(weights[0], self.run_dir / "best.caffemodel")
            self.best = {"iteration": iteration, "accuracy": value, "output": name, "snapshot": weights[0].name}
            files.write_atomic(self.run_dir / "best.json", json.dumps(self.best, indent=2) + "\n")
            self.stale_tests = 0
        elif not improved:
            self.stale_tests += 1
        self._prune(ranked_up_to=iteration)
        if self.options.early_stop and self.stale_tests >= self.options.early_stop:
            self.stop_requested = True

    def _on_event(self, event: Event) -> None:
        if event.kind == "snapshot":
            self.last_snapshot = Path(event.text)
        elif event.kind == "solverstate":
            self.last_state = Path(event.text)
        elif event.kind == "fatal":
            self.fatal.append(event.text)
        elif event.kind == "stopped":
            self.stopped_early = True
        elif event.kind == "done":
            self.done = True
            self.iteration = max(self.iteration, self.max_iter)   # caffe logs no line for the last iteration
            self._report()                                          # when display does not divide max_iter

    def _prune(self, ranked_up_to: int) -> None:
        """With snapshots at every test pass, keep only the best, those the user's interval asked for, and any not
        ranked yet (caffe may be ahead of the log lines read so far; the newest stays for --resume)."""
        folder = self.run_dir / SNAPSHOT_DIR
        if not folder.is_dir():
            return
        best = self.best["iteration"] if self.best else None
        for path in folder.iterdir():
            iteration = snapshot_iteration(path)
            if iteration is None or iteration >= ranked_up_to or iteration == best:
                continue
            if not (self.user_snapshot and iteration % self.user_snapshot == 0):
                path.unlink(missing_ok=True)

    def finish(self) -> None:
        """After caffe exits: of the snapshots never ranked, keep only the newest (for --resume)."""
        folder = self.run_dir / SNAPSHOT_DIR
        if self.options.keep_best and folder.is_dir():
            newest = max((snapshot_iteration(p) or 0 for p in folder.iterdir()), default=0)
            self._prune(ranked_up_to=newest)

    def _report(self) -> None:
        elapsed = time.monotonic() - self.started
        eta = None
        if self.first_iteration is not None and self.iteration > self.first_iteration:
            rate = (self.iteration - self.first_iteration) / max(time.monotonic() - self.first_time, 1e-9)
            eta = max(self.max_iter - self.iteration, 0) / rate
        self.callback(Progress(self.iteration, self.max_iter, self.loss, self.lr, self.accuracy, elapsed, eta))


class _SigintForwarder:
    """While caffe runs: the first Ctrl-C becomes caffe's SIGINT (snapshot, then stop), a second one kills it."""

    def __init__(self, process: subprocess.Popen):
        self.process, self.count, self.previous = process, 0, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, _signum, _frame) -> None:
        self.count += 1
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if self.count == 1 else signal.SIGKILL)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _caffe_env(install: CaffeInstall) -> dict:
    env = install.env()
    env["GLOG_logtostderr"] = "1"     # the whole log on the pipe, no /tmp/caffe.* files
    env.pop("GLOG_minloglevel", None)  # the INFO lines are the progress
    return env


def _watch(command: list[str], run_dir: Path, install: CaffeInstall, watch: Watch, log_mode: str,
           on_started: Callable[[], None]) -> int:
    """Launch caffe, copy its output to caffe.log, parse it line by line; returns caffe's exit status."""
    parser = LogParser()
    with open(run_dir / "caffe.log", log_mode + "b") as log:
        process = subprocess.Popen(command, cwd=run_dir, env=_caffe_env(install), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        on_started()  # bookkeeping while caffe sets up its nets, not before
        with _SigintForwarder(process) as forwarder:
            for raw in process.stdout:
                log.write(raw)
                for item in parser.feed(raw.decode(errors="replace")):
                    watch.on_item(item)
                _act_on_requests(watch, process)
            for item in parser.close():
                watch.on_item(item)
            status = process.wait()
        watch.interrupts = forwarder.count
    return status


def _act_on_requests(watch: Watch, process: subprocess.Popen) -> None:
    if watch.tripped is not None and process.poll() is None:
        process.kill()  # a diverged net is not worth a snapshot
    elif watch.stop_requested and process.poll() is None and not watch.stop_sent:
        watch.stop_sent = True
        process.send_signal(signal.SIGINT)  # early stop: caffe snapshots and stops


def _failure(watch: Watch, status: int, run_dir: Path) -> RunError:
    last = watch.fatal[-1] if watch.fatal else f"caffe exited with status {status}"
    last = re.sub(r"^[FEWI]\d{4,8} [\d:.]+\s+\d+ ", "", last)
    return RunError(f"caffe train failed: {last}", where=str(run_dir / "caffe.log"),
                    fix="read the end of caffe.log; `caffetune run` checks most causes before launching (do not "
                        "pass --no-preflight)")


# --- the two entry points -----------------------------------------------------------------------------------------
def start(options: RunOptions, callback: Callback = _quiet, base: Path | None = None) -> RunResult:
    """Check, prepare runs/<name>/ and train. Raises PreflightError before launching when a check fails."""
    install = caffe_tools.find_caffe(options.caffe)
    prepared = prepare(options, install, base)
    flags, mode, notices = gpu_flags(install, options.gpu, options.strict_gpu, prepared.solver)
    for notice in notices:
        callback(notice)
    if options.preflight:
        roles = {name: role for role, names in prepared.solver_fields.items() for name in names}
        report = preflight.check(prepared.nets, weights=prepared.weights, snapshot=prepared.snapshot,
                                 install=install, roles=roles)
        for line in report.info:
            callback(Notice("info", line))
        report.raise_for_problems()
    run_dir = (Path(base or Path.cwd()) / options.runs_root / (options.name or default_name(options.solver)))
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"the run directory {run_dir} exists already", where=str(run_dir),
                       fix=f"continue it with `caffetune run --resume {run_dir}`, or pick another --name")
    solver = finalize_solver(prepared, options, run_dir.resolve(), mode)
    options = replace(options, images_per_loss=images_per_loss(prepared.nets.values(), solver))
    write_run_dir(run_dir, prepared, solver)
    weights = fit_new_heads(run_dir.resolve(), prepared, options, callback) if options.fit_head else prepared.weights
    command = [str(install.binary), "train", f"-solver={run_dir.resolve() / 'solver.prototxt'}"]
    if prepared.snapshot:
        command.append(f"-snapshot={prepared.snapshot}")
    if weights:
        command.append(f"-weights={','.join(str(w) for w in weights)}")
    return _launch(command + flags, run_dir.resolve(), install, options, solver, prepared.solver.snapshot,
                   callback, resume_from=None, notices=notices)


def fit_new_heads(run_dir: Path, prepared: Prepared, options: RunOptions, callback: Callback) -> list[Path]:
    """--fit-head: fit the train net's new head(s) on the pretrained features; train from FITTED_WEIGHTS."""
    if len(prepared.weights) != 1 or prepared.snapshot:
        raise RunError("--fit-head needs exactly one pretrained .caffemodel (--weights) and no --snapshot",
                       fix="pass one --weights file, or leave out --fit-head")
    names = prepared.solver_fields.get("train_net") or prepared.solver_fields.get("net")
    if not names:
        raise RunError("--fit-head needs the solver's train net in a file (net: or train_net:)",
                       fix="write the net to a .prototxt and name it in the solver's net: field")
    train_net = run_dir / names[0]
    callback(Notice("info", f"fitting the new head(s) on {prepared.weights[0].name}'s features of the training set"))
    report = head_fit.fit_heads(train_net, prepared.weights[0], run_dir / FITTED_WEIGHTS, caffe=options.caffe,
                               check=False)   # preflight has checked these nets already (or was turned off)
    files.write_atomic(run_dir / FIT_REPORT, json.dumps(report.as_dict(), indent=2, sort_keys=True) + "\n")
    for fit in report.fits:
        callback(Notice("info", f"fitted {fit.name}: {fit.images} images x {fit.features} features, training "
                                f"accuracy {fit.accuracy:.1%}, loss {fit.loss:.4f}"))
    return [run_dir / FITTED_WEIGHTS]


def resume(run_dir: Path | str, callback: Callback = _quiet, options: RunOptions | None = None) -> RunResult:
    """Continue a run from its newest .solverstate; the log and the metrics continue where the snapshot was."""
    run_dir = Path(run_dir).resolve()
    state = newest_solverstate(run_dir)
    if not (run_dir / "solver.prototxt").is_file() or not (run_dir / "run.json").is_file():
        raise RunError("not a caffetune run directory (no solver.prototxt / run.json)", where=str(run_dir),
                       fix="pass the runs/<name> folder that `caffetune run` created")
    if state is None:
        raise RunError("the run has no .solverstate snapshot to resume from", where=str(run_dir / SNAPSHOT_DIR),
                       fix="start it again with `caffetune run` (a run snapshots on Ctrl-C and every snapshot "
                           "interval)")
    saved = json.loads((run_dir / "run.json").read_text())["options"]
    options = options or RunOptions(solver=run_dir / "solver.prototxt", keep_best=saved.get("keep_best", True),
                                    early_stop=saved.get("early_stop"), gpu=saved.get("gpu"),
                                    caffe=saved.get("caffe"), images_per_loss=saved.get("images_per_loss", 1),
                                    watchdog_patience=saved.get("watchdog_patience", 3))
    install = caffe_tools.find_caffe(options.caffe)
    solver = prototxt.load(run_dir / "solver.prototxt", "SolverParameter")
    flags, _mode, notices = gpu_flags(install, options.gpu, options.strict_gpu, solver)
    for notice in notices:
        callback(notice)
    command = [str(install.binary), "train", f"-solver={run_dir / 'solver.prototxt'}", f"-snapshot={state}"] + flags
    user_snapshot = int(saved.get("user_snapshot") or 0)
    return _launch(command, run_dir, install, options, solver, user_snapshot, callback,
                   resume_from=snapshot_iteration(state), notices=notices)


def _launch(command: list[str], run_dir: Path, install: CaffeInstall, options: RunOptions, solver: Message,
            user_snapshot: int, callback: Callback, resume_from: int | None, notices: list[Notice]) -> RunResult:
    quoted = shlex.join(command)
    with open(run_dir / "command.txt", "a") as handle:
        handle.write(f"cd {shlex.quote(str(run_dir))} && {quoted}\n")
    callback(Notice("info", f"run directory {run_dir}"))
    callback(Notice("info", quoted))

    def record() -> None:
        _record_json(run_dir, options, install, {"command": command, "resume_from": resume_from,
                                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _remember_user_snapshot(run_dir, user_snapshot)

    with MetricsWriter(run_dir, resume_from=resume_from) as metrics:
        watch = Watch(run_dir, solver, options, metrics, callback, user_snapshot)
        status = _watch(command, run_dir, install, watch, "a" if resume_from is not None else "w", record)
        watch.finish()
        records = list(metrics.records)
    plots.write_png(records, run_dir / "plot.png", title=run_dir.name)
    if watch.tripped is not None:
        raise watch.tripped
    interrupted = watch.interrupts > 0
    if interrupted and newest_solverstate(run_dir) is None:
        raise RunInterrupted("interrupted before caffe wrote a snapshot: there is nothing to resume",
                             where=str(run_dir), fix="start the run again (with another --name)")
    if status != 0 and not interrupted:
        raise _failure(watch, status, run_dir)
    state = newest_solverstate(run_dir)
    snapshot = next((p for p in _snapshot_pair(run_dir, snapshot_iteration(state)) if ".caffemodel" in p.name),
                    None) if state else None
    result_status = "interrupted" if interrupted else "early-stopped" if watch.stopped_early else "done"
    best = watch.best
    return RunResult(run_dir, result_status, snapshot_iteration(state) if state else watch.iteration, snapshot,
                     state, run_dir / "best.caffemodel" if best else None, best["accuracy"] if best else None,
                     records, notices)


def _remember_user_snapshot(run_dir: Path, user_snapshot: int) -> None:
    path = run_dir / "run.json"
    data = json.loads(path.read_text())
    data["options"]["user_snapshot"] = user_snapshot
    files.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
