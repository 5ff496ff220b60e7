"""Preflight checks of the solver and of the files given to start from (--snapshot, --weights).

- base_lr 0: nothing learns; max_iter unset or 0: nothing is trained;
- a TEST phase that caffe never runs (no test_iter) or cannot run (test_iter without test_interval, one test_iter per
  test_net file);
- test_iter x batch_size against the validation set: part of it unseen, or read past its end (wrapping);
- --snapshot given a .caffemodel, a missing one, or with --weights;
- the learning-rate policy (unknown, missing stepsize, gamma that zeroes or grows the rate) and the solver type.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import Problem
from caffetune.model import caffemodels, layers
from caffetune.train.checks_common import Run, batch_size, error, plural, warning

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


# --- the files to start from --------------------------------------------------------------------------------------
def file_kind(path: Path) -> str | None:
    """"caffemodel" (a NetParameter with weights), "solverstate" or None, from the file's top-level fields: Caffe
    always writes a net's `name` (field 1, a string) and a solver state's `iter` (field 1, a varint)."""
    with open(path, "rb") as handle:
        if handle.read(8) == _HDF5_MAGIC:
            name = path.name
            return "caffemodel" if ".caffemodel" in name else "solverstate" if ".solverstate" in name else None
        if path.stat().st_size == 0:
            return None
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                for number, wire, _start, _end in caffemodels.iter_fields(data, 0, len(data)):
                    if number == 1:
                        return "caffemodel" if wire == caffemodels.LENGTH else "solverstate"
                    if number == 100:
                        return "caffemodel"
            except caffemodels.WireError:
                return None
    return None


def check_start_files(weights: list[Path], snapshot: Path | None) -> list[Problem]:
    problems = []
    if snapshot and weights:
        problems.append(error("both a snapshot and weights are given", str(snapshot),
                              "use --snapshot to continue a run, or --weights to fine-tune; caffe refuses both"))
    if snapshot and not Path(snapshot).is_file():
        return problems + [error(f"snapshot {snapshot} does not exist", str(snapshot),
                                 "pass a .solverstate written by caffe (runs/<name>/snapshots/), or use "
                                 "`caffetune run --resume runs/<name>`")]
    if snapshot and file_kind(Path(snapshot)) == "caffemodel":
        state = Path(str(snapshot).replace(".caffemodel", ".solverstate"))
        sibling = f"; its solver state would be {state}" if state != Path(snapshot) and state.is_file() else ""
        problems.append(error(f"--snapshot {snapshot} is a .caffemodel (weights), not a .solverstate", str(snapshot),
                              f"to fine-tune from these weights pass --weights {snapshot}; to continue a run pass "
                              f"its .solverstate{sibling}",
                              "caffe's -snapshot restores the solver's state and stops with `Check failed: "
                              "state.history_size() == history_.size()`"))
    for path in weights:
        if Path(path).is_file() and file_kind(Path(path)) == "solverstate":
            problems.append(error(f"--weights {path} is a .solverstate, not a .caffemodel", str(path),
                                  "pass the .caffemodel written next to it, or continue the run with --snapshot "
                                  f"{path}"))
    return problems


# --- the solver ---------------------------------------------------------------------------------------------------
def _test_only_layers(net: Message) -> list[Message]:
    return [layer for layer in layers.all_layers(net) if layers.phases(layer) == {"TEST"}]


def _test_instances(run: Run) -> list[tuple[str, int]]:
    """(net file, test_iter) of each test net caffe builds: the test_net files first, then the `net` file once per
    remaining test_iter (Solver::InitTestNets); inline test_net_param nets are not checked here."""
    solver = run.solver
    iters = list(solver.test_iter)[len(solver.test_net_param):]
    files = [name for name in run.nets if run.role(name) == "test_net"]
    generic = [name for name in run.nets if run.role(name) == "net"]
    instances = list(zip(files, iters))
    for test_iter in iters[len(files):]:
        instances += [(name, test_iter) for name in generic[:1]]
    return instances


def check_learning_rate(run: Run) -> list[Problem]:
    """base_lr 0: an error when unset (SolverParameter has no default), a warning when written (it may be meant:
    a run that only tests)."""
    if run.solver is None or run.solver.base_lr > 0:
        return []
    written = run.solver.HasField("base_lr")
    level = warning if written else error
    return [level(f"base_lr is {run.solver.base_lr:g}" + ("" if written else " (unset)"), "solver",
                  "set base_lr (0.001 is a common start for fine-tuning)",
                  "every update is multiplied by base_lr: the run learns nothing")]


def check_max_iter(run: Run) -> list[Problem]:
    """max_iter unset (it defaults to 0) or not positive: Solver::Solve runs max_iter - iter iterations, so caffe
    builds the nets, snapshots the start weights and stops having trained nothing. The runner checks the solver
    it will launch, with --max-iter applied."""
    solver = run.solver
    if solver is None or not _has(solver, "max_iter") or solver.max_iter > 0:
        return []
    unset = "" if solver.HasField("max_iter") else " (unset: it defaults to 0)"
    return [error(f"max_iter is {solver.max_iter}{unset}", "solver",
                  "set max_iter: the iterations to train (epochs x training images / batch_size; `caffetune rewrite "
                  "--solver ... --epochs N` computes it), or pass --max-iter N",
                  "caffe trains max_iter iterations: it would start, save the start weights and stop at once")]


def check_testing(run: Run) -> list[Problem]:
    """Whether caffe will test at all, and whether it can."""
    solver = run.solver
    if solver is None:
        return []
    test_files = [name for name in run.nets if run.role(name) == "test_net"]
    tested = [name for name in run.nets if run.role(name) == "net" and _test_only_layers(run.nets[name])]
    if len(solver.test_iter) == 0 and tested and not test_files and not len(solver.test_net_param):
        layer = _test_only_layers(run.nets[tested[0]])[0]
        return [warning(f"{tested[0]} has a TEST phase (e.g. layer {layer.name}) but the solver has no test_iter, "
                        "so caffe never tests", "solver",
                        "add test_iter: <validation images / TEST batch_size> and test_interval: <iterations "
                        "per epoch> (`caffetune rewrite --solver ... --epochs N` computes both)",
                        "without test passes there is no validation accuracy, no best.caffemodel and no early "
                        "stopping")]
    if len(solver.test_iter) and solver.test_interval <= 0:
        return [error(f"test_iter is set but test_interval is {solver.test_interval}", "solver",
                      "set test_interval (iterations between test passes, e.g. one epoch)",
                      "caffe stops at start with `Check failed: param_.test_interval() > 0`")]
    wanted = len(test_files) + len(solver.test_net_param)
    if wanted and len(solver.test_iter) < wanted:
        return [error(f"{plural(wanted, 'test net')} but {plural(len(solver.test_iter), 'test_iter')}", "solver",
                      "give one test_iter per test_net, in the same order",
                      "caffe stops at start with `test_iter must be specified for each test network`")]
    return []


def check_test_coverage(run: Run) -> list[Problem]:
    """test_iter x batch_size against the validation set: a pass must see every image, and not much more."""
    if run.solver is None:
        return []
    problems = []
    for name, test_iter in _test_instances(run):
        for layer in run.layers_in(name, "TEST"):
            scan = run.scans.get((name, layer.name, "TEST"))
            batch = batch_size(layer)
            if scan is None or not scan.count or not batch:
                continue
            problems += _coverage(scan.count, batch, test_iter, f"solver: test_iter for {name} (layer {layer.name},"
                                  f" {scan.source})")
    return problems


def _coverage(size: int, batch: int, test_iter: int, where: str) -> list[Problem]:
    read = test_iter * batch
    needed = math.ceil(size / batch)
    exact = "" if size % batch == 0 else f" (or a batch_size that divides {size}, so that no image counts twice)"
    fix = f"set test_iter: {needed}{exact}"
    if read < size:
        return [warning(f"each test pass reads {test_iter} x {batch} = {read} of the {size} validation images",
                        where, fix, f"the other {size - read} are never tested; the TEST data layer continues where "
                        "it stopped, so each pass measures another subset")]
    if read >= size + batch:
        return [warning(f"each test pass reads {test_iter} x {batch} = {read} images from a validation set of "
                        f"{size}", where, fix,
                        f"the data layer wraps around: {read - size} images are counted twice in every accuracy")]
    return []


# --- the learning-rate schedule and the solver type -----------------------------------------------------------------
# SGDSolver::GetLearningRate: the policies, and the fields each one reads (it aborts on any other policy name).
LR_POLICIES = {"fixed": (), "step": ("gamma", "stepsize"), "exp": ("gamma",), "inv": ("gamma", "power"),
               "multistep": ("gamma", "stepvalue"), "poly": ("power",), "sigmoid": ("gamma", "stepsize")}
_DECAYING = ("step", "exp", "multistep")   # lr = base_lr * gamma ^ k: gamma 0 zeroes it, gamma > 1 grows it
SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")   # BVLC's registered solvers


def _has(message: Message, name: str) -> bool:
    return name in message.DESCRIPTOR.fields_by_name


def check_lr_policy(run: Run) -> list[Problem]:
    """Caffe checks the policy only when it computes the first update (after the first forward/backward, and the
    first test pass): an unknown name or a missing stepsize aborts then; an unset gamma silently zeroes the rate."""
    solver = run.solver
    if solver is None or not _has(solver, "lr_policy"):
        return []
    policy = solver.lr_policy
    if not solver.HasField("lr_policy"):
        return [error("the solver has no lr_policy (it has no default)", "solver",
                      'add lr_policy: "fixed", or "step" with gamma and stepsize',
                      "caffe stops at the first update with `Unknown learning rate policy: `")]
    if policy not in LR_POLICIES:
        close = [name for name in LR_POLICIES if name == policy.strip().lower() or name == policy.rstrip("s")]
        return [error(f'lr_policy "{policy}" is not a learning-rate policy caffe knows', "solver",
                      f'use lr_policy: "{close[0]}"' if close else
                      f"use one of: {', '.join(LR_POLICIES)} (`\"step\"` with gamma and stepsize is the usual)",
                      f"caffe stops at the first update with `Unknown learning rate policy: {policy}`")]
    wanted = LR_POLICIES[policy]
    if "stepsize" in wanted and solver.stepsize <= 0:
        return [error(f'lr_policy "{policy}" without a stepsize', "solver",
                      "set stepsize: the iterations between two drops of the rate (e.g. a few epochs)",
                      "caffe stops at the first update with `Check failed: this->param_.stepsize() > 0`")]
    problems = []
    if policy in _DECAYING and solver.gamma <= 0:
        level = warning if solver.HasField("gamma") else error
        problems.append(level(f'lr_policy "{policy}" with gamma {solver.gamma:g}' +
                              ("" if solver.HasField("gamma") else " (unset: gamma has no default)"), "solver",
                              "set gamma: the factor applied at each step, e.g. gamma: 0.1",
                              "the rate is base_lr x gamma ^ steps: it becomes 0 at the first step and nothing "
                              "learns after it"))
    elif policy in _DECAYING and solver.gamma > 1:
        problems.append(warning(f'lr_policy "{policy}" with gamma {solver.gamma:g} makes the rate grow at each step',
                                "solver", f"set gamma to a factor below 1 (e.g. gamma: {1 / solver.gamma:g})",
                                "the rate is base_lr x gamma ^ steps: it grows until the loss diverges"))
    if policy == "multistep" and not len(solver.stepvalue):
        problems.append(warning('lr_policy "multistep" without any stepvalue: the rate never drops', "solver",
                                "add stepvalue lines (the iterations at which the rate is multiplied by gamma), or "
                                'use lr_policy: "fixed"'))
    return problems


def check_solver_type(run: Run) -> list[Problem]:
    """The solver's `type` is looked up by exact name in caffe's solver registry; the old `solver_type` enum and
    `type` together are refused."""
    solver = run.solver
    if solver is None or not _has(solver, "type"):
        return []
    if _has(solver, "solver_type") and solver.HasField("solver_type") and solver.HasField("type"):
        return [error("the solver sets both solver_type (the old enum) and type", "solver",
                      "keep only `type` (e.g. type: \"Adam\")",
                      "caffe stops with `Failed to upgrade solver: old solver_type field (enum) and new type field "
                      "(string) cannot be both specified`")]
    name = solver.type
    spelled = [known for known in SOLVER_TYPES if known.lower() == name.lower()]
    if name not in SOLVER_TYPES and spelled:
        return [error(f'solver type "{name}" is not a solver caffe knows (names are case-sensitive)', "solver",
                      f'write type: "{spelled[0]}"',
                      f"caffe stops at start with `Unknown solver type: {name}`")]
    return []


def check_solver(run: Run) -> list[Problem]:
    return (check_learning_rate(run) + check_max_iter(run) + check_lr_policy(run) + check_solver_type(run) +
            check_testing(run) + check_test_coverage(run))
