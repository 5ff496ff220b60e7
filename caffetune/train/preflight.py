"""Checks before `caffe train` starts: every known way a fine-tuning run fails late or silently learns nothing.

`check(nets, weights=..., snapshot=..., install=..., roles=..., solver=...)` returns a `Report`: errors (`problems`:
caffe would crash or the run cannot learn, so it does not start), `warnings` (very likely a mistake; the run starts
unless strict) and the facts worth printing (which layers are copied from the weights, which start from scratch).
`Report.raise_for_problems(strict=False)` raises PreflightError. docs/preflight.md lists every check with its level,
why it matters, the fix and its cost. The checks live by topic:

- checks_data: data layers against their datasets (one streaming pass each, data_scan);
- checks_hdf5: HDF5Data layers (the list of .h5 files and their datasets);
- checks_net: the nets (phases, Python layers, frozen layers, BatchNorm on batches of one);
- checks_solver: the solver (testing, coverage, base_lr) and the files to start from;
- checks_weights: the pretrained weights against the nets (and whether anything is copied or can learn);
- checks_feed: what the nets are fed and minimise (unfed Input layers, no loss, labels, TRAIN/TEST preprocessing);
- build_errors: caffe's build failures explained (the layer, the cause, the fix).
Whether a net builds, and the exact blob shapes, come from the real Caffe: pycaffe builds each net in a subprocess.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import PreflightError, Problem
from caffetune.model import caffe_tools, prototxt
from caffetune.model.caffe_tools import CaffeInstall
from caffetune.train import build_errors, checks_data, checks_feed, checks_net, checks_solver, checks_weights
from caffetune.train.checks_common import ERROR, Run


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)   # errors: the run does not start
    warnings: list[Problem] = field(default_factory=list)   # likely mistakes: the run starts unless strict
    info: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)      # learnable layers whose blobs come from the weights
    scratch: list[str] = field(default_factory=list)     # learnable layers initialised by their fillers
    param_shapes: dict = field(default_factory=dict)      # "file:PHASE" -> layer -> blob shapes (from pycaffe)

    def add(self, found: list[Problem]) -> None:
        for problem in found:
            (self.problems if problem.level == ERROR else self.warnings).append(problem)

    def raise_for_problems(self, strict: bool = False) -> None:
        """PreflightError with the errors (and, when strict, the warnings)."""
        blocking = self.problems + (self.warnings if strict else [])
        if blocking:
            raise PreflightError(blocking)


# --- building with the real Caffe -------------------------------------------------------------------------------
_BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    import caffe
    caffe.set_mode_cpu()
    net = caffe.Net(sys.argv[1], getattr(caffe, sys.argv[2]))
    print(json.dumps({"params": {name: [list(b.data.shape) for b in blobs] for name, blobs in net.params.items()},
                      "loss": [name for name, weight in zip(net._blob_names, net._blob_loss_weights) if weight]}))
""")


def build_with_caffe(install: CaffeInstall, net_file: Path, phase: str, timeout: int = 300) -> tuple[dict | None,
                                                                                                     str | None]:
    """Build a net with pycaffe in a subprocess: ({"params": layer -> param shapes, "loss": blobs with a loss
    weight}, None) or (None, caffe's error)."""
    try:
        result = caffe_tools.run_pycaffe(install, _BUILD_SCRIPT, [str(net_file), phase], timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"building the {phase} net took more than {timeout}s"
    if result.returncode == 0:
        return json.loads(result.stdout.strip().splitlines()[-1]), None
    lines = result.stderr.strip().splitlines()
    fatal = [line for line in lines if line.startswith("F") or "Check failed" in line or "Error" in line]
    return None, (fatal or lines or [f"exit status {result.returncode}"])[-1]


def check_builds(install: CaffeInstall, run: Run, report: Report) -> list[Problem]:
    """Build every net in the phases caffe will build it; collects the param shapes for the later checks."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="caffetune-preflight-") as tmp:
        for name, net in run.nets.items():
            path = Path(tmp) / name
            files.write_atomic(path, prototxt.format(net))
            failed: dict[str, list[str]] = {}
            for phase in run.phases(name):
                built, error = build_with_caffe(install, path, phase)
                if error:
                    failed.setdefault(caffe_tools.strip_glog_prefix(error), []).append(phase)
                else:
                    report.param_shapes[f"{name}:{phase}"] = built["params"]
                    run.loss_blobs[f"{name}:{phase}"] = built["loss"]
            problems += [build_errors.explain(error, net, name, phases) for error, phases in failed.items()]
    run.param_shapes = report.param_shapes
    return problems


# --- all together -----------------------------------------------------------------------------------------------
def check(nets: dict[str, Message], *, weights: list[Path] = (), snapshot: Path | None = None,
          install: CaffeInstall | None = None, roles: dict[str, str] | None = None,
          solver: Message | None = None) -> Report:
    """Every check on the nets of a run (file name -> net, paths absolute). `roles`: file name -> "net",
    "train_net" or "test_net", for the phases to build. `solver`: the SolverParameter, for the solver checks.
    Without `install` nothing is built and Python layers are not imported."""
    report = Report()
    run = Run(nets=dict(nets), roles=dict(roles or {}), solver=solver, weights=[Path(w) for w in weights])
    report.add(checks_solver.check_start_files(run.weights, snapshot))
    readable = [w for w in run.weights if not (w.is_file() and checks_solver.file_kind(w) == "solverstate")]
    run.pretrained, found = checks_weights.read_pretrained(readable)   # a .solverstate is reported above
    report.add(found)
    report.add(checks_data.check_data(run))
    report.add(checks_feed.check_feed(run))
    for name, net in run.nets.items():
        report.add(checks_net.check_accuracy_top_k(net, name))
    report.add(checks_net.check_frozen(run))
    report.add(checks_net.check_batch_norm(run))
    report.add(checks_solver.check_solver(run))
    if install is not None:
        report.add(checks_net.check_python_layers(run, install))
    if install is not None and not report.problems:
        report.add(check_builds(install, run, report))
    if not report.problems:   # an unbuilt net's loss is unknown; a deploy net is reported above
        report.add(checks_feed.check_loss(run))
    report.add(checks_net.check_phase_definitions(run))
    if run.pretrained:
        found, report.copied, report.scratch = checks_weights.check_copy(run)
        report.add(found)
        report.add(checks_weights.check_constant_weights(run, report.copied))
        report.add(checks_weights.check_head_kept(run, report.copied))
        report.add(checks_weights.check_nothing_copied(run, report.copied, report.scratch))
        source = ", ".join(Path(w).name for w in run.weights)
        report.info += [f"copied from {source}: {', '.join(report.copied) or 'no layer'}",
                        f"from scratch (fillers): {', '.join(report.scratch) or 'no layer'}"]
    report.add(checks_weights.check_frozen_fillers(run, report.scratch))
    report.add(checks_weights.check_global_stats_from_scratch(run, report.scratch))
    return report
