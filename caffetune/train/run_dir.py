"""The run directory: the solver and nets copied in (paths absolute, overrides applied), run.json, snapshots.

    runs/<name>/
      solver.prototxt, <net>.prototxt   copies (paths made absolute, snapshot_prefix and solver_mode set)
      command.txt, run.json             the exact command(s) and every option, for reproducing the run
      caffe.log                         caffe's full output (a resumed run appends to it)
      metrics.csv, metrics.jsonl        every display and test pass (a resumed run continues them)
      plot.png                          loss / accuracy / lr against iterations
      snapshots/                        caffe's .caffemodel and .solverstate files
      best.caffemodel, best.json        the snapshot with the best validation accuracy
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from caffetune import __version__, files
from caffetune.errors import RunError
from caffetune.model import prototxt
from caffetune.train.events import Notice

PATH_FIELDS = ("source", "mean_file", "root_folder")
SNAPSHOT_DIR = "snapshots"
SOLVER_FILE = "solver.prototxt"
RUN_JSON = "run.json"
_ITER_FILE = re.compile(r"_iter_(\d+)\.(caffemodel|solverstate)(\.h5)?$")


# --- paths as caffe resolves them ---------------------------------------------------------------------------------
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


# --- reading the user's solver and nets ---------------------------------------------------------------------------
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


def _net_files(solver: Message, base: Path, solver_path: Path) -> list[tuple[str, Path]]:
    """(solver field, path) of every net file the solver names; caffe resolves them from its working directory."""
    found = []
    for name in ("net", "train_net"):
        if solver.HasField(name):
            found.append((name, getattr(solver, name)))
    found += [("test_net", path) for path in solver.test_net]
    result, solver_dir = [], solver_path.parent
    for field_name, path in found:
        resolved = resolve(path, base)
        if not resolved.is_file() and resolve(path, solver_dir).is_file():
            resolved = resolve(path, solver_dir)  # a path written relative to the solver's own folder
        if not resolved.is_file():
            raise _net_not_found(field_name, path, base, solver_path)
        result.append((field_name, resolved))
    return result


def _net_not_found(field_name: str, path: str, base: Path, solver_path: Path) -> RunError:
    """The solver names a net file that is in neither place a relative path is looked up."""
    solver_dir = solver_path.parent
    if Path(path).expanduser().is_absolute():
        looked, fix = str(Path(path).expanduser()), f"correct the solver's {field_name}: path"
    else:
        looked = f"{resolve(path, base)} (from the current folder, as caffe resolves it) and " \
                 f"{resolve(path, solver_dir)} (from the solver's folder)"
        fix = (f"correct the solver's {field_name}: path (relative to the folder you run from, or to the solver's "
               f"folder {solver_dir}), or write it as an absolute path")
    return RunError(f'the solver\'s {field_name}: "{path}" names no file: looked for {looked}',
                    where=str(solver_path), fix=fix)


def _unique_name(path: Path, taken: set[str]) -> str:
    name, index = path.name, 1
    while name in taken:
        index += 1
        name = f"{path.stem}-{index}{path.suffix}"
    taken.add(name)
    return name


def prepare(options, install=None, base: Path | None = None) -> Prepared:
    """Read the solver and its nets (of RunOptions), make every path absolute, apply `options.transform_net`.
    `install` is not used (kept for callers that pass it)."""
    base = (base or Path.cwd()).resolve()
    solver_path = resolve(str(options.solver), base)
    solver = prototxt.load(solver_path, "SolverParameter")
    nets, fields, sources, taken = {}, {}, {}, {SOLVER_FILE}
    transform = options.transform_net or (lambda net: net)
    for field_name, path in _net_files(solver, base, solver_path):
        name = _unique_name(path, taken)
        nets[name] = transform(absolutize_paths(prototxt.load(path), base))
        fields.setdefault(field_name, []).append(name)
        sources[name] = path
    for inline in ("net_param", "train_net_param"):
        if solver.HasField(inline):
            getattr(solver, inline).CopyFrom(transform(absolutize_paths(getattr(solver, inline), base)))
    weights = [resolve(str(w), base) for w in options.weights]
    snapshot = resolve(str(options.snapshot), base) if options.snapshot else None
    return Prepared(solver, nets, fields, weights, snapshot, [], sources)


def _snapshot_interval(solver: Message, keep_best: bool) -> int:
    """Snapshot at every test pass when keeping the best (test at N happens right after snapshot N)."""
    if not keep_best or not solver.test_interval or not len(solver.test_iter):
        return solver.snapshot
    return math.gcd(solver.snapshot, solver.test_interval) if solver.snapshot else solver.test_interval


def finalize_solver(prepared: Prepared, options, run_dir: Path, mode: str) -> Message:
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


# --- the directory ------------------------------------------------------------------------------------------------
def default_name(solver: Path) -> str:
    return f"{Path(solver).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def new_run_dir(base: Path | None, runs_root: Path, name: str) -> Path:
    """runs_root/name (absolute); refuses a folder that holds something already."""
    run_dir = (Path(base or Path.cwd()) / runs_root / name).resolve()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"the run directory {run_dir} exists already", where=str(run_dir),
                       fix=f"continue it with `caffetune run --resume {run_dir}`, or pick another --name")
    return run_dir


def write_run_dir(run_dir: Path, prepared: Prepared, solver: Message) -> None:
    (run_dir / SNAPSHOT_DIR).mkdir(parents=True, exist_ok=True)
    for name, net in prepared.nets.items():
        files.write_atomic(run_dir / name, prototxt.format(net))
    files.write_atomic(run_dir / SOLVER_FILE, prototxt.format(solver))


def append_command(run_dir: Path, command: list[str]) -> str:
    """Add the command to command.txt (every launch, so the run can be reproduced); returns it quoted."""
    quoted = shlex.join(command)
    with open(run_dir / "command.txt", "a") as handle:
        handle.write(f"cd {shlex.quote(str(run_dir))} && {quoted}\n")
    return quoted


NOT_RECORDED = ("transform_net", "hook", "on_record")   # code, not settings


def _options_json(options) -> dict:
    settings = {}
    for option in dataclasses.fields(options):
        value = getattr(options, option.name)
        if option.name not in NOT_RECORDED:
            settings[option.name] = str(value) if isinstance(value, Path) else \
                [str(x) for x in value] if isinstance(value, list) else value
    return settings


def record_launch(run_dir: Path, options, install, launch: dict, user_snapshot: int) -> None:
    """Add a launch to run.json (the options of the first launch stay: a resume continues the same run)."""
    path = run_dir / RUN_JSON
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("launches", [])
    data.update({"caffetune": __version__, "caffe": str(install.binary), "caffe_version": install.version,
                 "options": data.get("options", _options_json(options))})
    data["options"]["user_snapshot"] = user_snapshot
    data["launches"].append(launch)
    files.write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def saved_run(run_dir: Path) -> dict:
    """run.json of a run directory that can be resumed; RunError when it is not one or has no snapshot."""
    if not (run_dir / SOLVER_FILE).is_file() or not (run_dir / RUN_JSON).is_file():
        raise RunError("not a caffetune run directory (no solver.prototxt / run.json)", where=str(run_dir),
                       fix="pass the runs/<name> folder that `caffetune run` created")
    if newest_solverstate(run_dir) is None:
        raise RunError("the run has no .solverstate snapshot to resume from", where=str(run_dir / SNAPSHOT_DIR),
                       fix="start it again with `caffetune run` (a run snapshots on Ctrl-C and every snapshot "
                           "interval)")
    return json.loads((run_dir / RUN_JSON).read_text())


# --- snapshots ----------------------------------------------------------------------------------------------------
def snapshot_iteration(path: Path) -> int | None:
    match = _ITER_FILE.search(path.name)
    return int(match.group(1)) if match else None


def newest_solverstate(run_dir: Path) -> Path | None:
    """The .solverstate of the highest iteration in a run directory's snapshots (None when there is none)."""
    states = [p for p in (Path(run_dir) / SNAPSHOT_DIR).glob("*_iter_*.solverstate*") if snapshot_iteration(p)]
    return max(states, key=snapshot_iteration, default=None)


def snapshot_pair(run_dir: Path, iteration: int) -> list[Path]:
    return [p for p in (run_dir / SNAPSHOT_DIR).glob(f"*_iter_{iteration}.*") if snapshot_iteration(p) == iteration]


def snapshot_weights(run_dir: Path, iteration: int | None) -> Path | None:
    """The .caffemodel snapshot of an iteration, if it is there."""
    if iteration is None:
        return None
    return next((p for p in snapshot_pair(run_dir, iteration) if ".caffemodel" in p.name), None)


def copy_atomic(source: Path, target: Path) -> None:
    with open(source, "rb") as reader, files.atomic_output(target) as writer:
        shutil.copyfileobj(reader, writer, 1 << 20)
