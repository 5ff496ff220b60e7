"""`run --cache-features`: the pieces a run directory needs to train the top on cached trunk outputs.

    CacheHook     the runner's RunHook: before the launch, decide (on when exact, unless told otherwise) and point
                  caffe at the top; after caffe stops, make the snapshots full-net caffemodels; on --resume, the top
    prepare()     find the cut, build or reuse the feature cache (progress per batch), write top.prototxt and
                  top-solver.prototxt into the run directory (and the mirror sequence, when the TRAIN transform
                  mirrors); returns what caffe is started with and what run.json records
    finish()      every top snapshot and best.caffemodel in the run directory becomes a full-net caffemodel

The run directory keeps the user's solver and net copies (what the run means) beside the top net (what caffe ran).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import CaffetuneError, RunError
from caffetune.model import caffe_tools, caffemodels, prototxt
from caffetune.transfer import crop_cache, feature_cache, graft, mirror_replay, top_net, trunk_cut

TOP_NET = "top.prototxt"
TOP_SOLVER = "top-solver.prototxt"
CACHE_JSON = "feature-cache.json"
START_WEIGHTS = "top-start.caffemodel"       # the original weights plus the new layers' seeded filler values
SEQUENCE_DIR = "features"


@dataclass
class CachedRun:
    solver: Path                       # the top's solver in the run directory
    weights: Path                      # -weights for the top (the original caffemodel: Caffe takes the top's layers)
    full_net: Path                     # the run directory's copy of the user's train_val
    original_weights: Path
    cut: trunk_cut.Cut
    record: dict = field(default_factory=dict)   # what run.json records


def decline_reason(net: Message, crops: int = 0) -> str | None:
    """Why --cache-features would refuse this net (None: it can cache); used to decide the default quietly."""
    try:
        cut = trunk_cut.find_cut(net)
        feature_cache.check_transform(cut, crops)
    except CaffetuneError as error:
        return error.what
    return None


def prepare(run_dir: Path, net_file: str, net: Message, solver: Message, weights: Path,
            install: caffe_tools.CaffeInstall, progress: Callable[[object], None] | None = None,
            crops: int = 0) -> CachedRun:
    """Cache the trunk's outputs and write the top's net and solver into `run_dir` (net_file: the train_val copy)."""
    progress = progress or (lambda item: None)
    cut = trunk_cut.find_cut(net)
    exact = feature_cache.check_transform(cut, crops)
    top_net.check_trunk_weights(weights, net, cut)
    started = time.perf_counter()
    cache = feature_cache.build(net, cut, weights, install, progress=progress, crops=crops)
    sources = {phase: cache.list_file(phase) for phase in cut.phases}
    batches = {phase: cache.phase(phase)["batch"] for phase in cut.phases}
    rows = mirror_replay.sequence_rows(solver, batches["TRAIN"])
    seed = solver.random_seed if solver.HasField("random_seed") else None
    if exact.crops:
        sources["TRAIN"] = crop_cache.write_sequence(cache, run_dir / SEQUENCE_DIR, rows, seed,
                                                     feature_cache.write_hdf5)
    elif exact.mirror:
        sources["TRAIN"] = mirror_replay.write_mirror_sequence(cache, run_dir / SEQUENCE_DIR, rows, seed,
                                                                exact.draws_per_image)
    names = {phase: cache.phase(phase)["datasets"] for phase in cut.phases}
    top = top_net.build(net, cut, sources, names, batches)
    start = _start_weights(run_dir, net_file, solver, weights, cut, install)
    files.write_atomic(run_dir / TOP_NET, prototxt.format(top))
    files.write_atomic(run_dir / TOP_SOLVER, prototxt.format(top_net.top_solver(solver, run_dir / TOP_NET)))
    record = {"cut": cut.as_dict(), "cache": cache.as_dict(), "mirror": exact.mirror, "notes": cut.notes +
              exact.notes, "prepare_seconds": time.perf_counter() - started,
              "sequence_bytes": feature_cache._folder_bytes(run_dir / SEQUENCE_DIR)
              if (run_dir / SEQUENCE_DIR).is_dir() else 0}
    files.write_atomic(run_dir / CACHE_JSON, json.dumps(record | {"weights": str(weights), "net": net_file,
                                                                  "start_weights": str(start)},
                                                        indent=2) + "\n")
    return CachedRun(run_dir / TOP_SOLVER, start, run_dir / net_file, weights, cut, record)


def _start_weights(run_dir: Path, net_file: str, solver: Message, weights: Path, cut: trunk_cut.Cut,
                   install) -> Path:
    """The top's -weights: the original caffemodel, or, when the solver fixes random_seed and a trained layer is
    not in it, a copy with that layer's filler values as the full net's `caffe train` would draw them (the top net
    alone draws other numbers from the same seed)."""
    present = {record.name for record in caffemodels.read_layers(weights)}
    missing = [name for name in cut.trainable if name not in present]
    if not missing or not solver.HasField("random_seed") or solver.random_seed < 0:
        return weights
    values = feature_cache.filler_values(install, run_dir / net_file, weights, solver.random_seed, missing, run_dir)
    output = run_dir / START_WEIGHTS
    graft.graft(weights, run_dir / net_file, output, fitted=values)
    return output


def load(run_dir: Path) -> CachedRun | None:
    """The cached-run description of a run directory (for --resume and finish); None for a plain run."""
    path = Path(run_dir) / CACHE_JSON
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    net = prototxt.load(Path(run_dir) / saved["net"])
    cut = trunk_cut.find_cut(net)
    return CachedRun(Path(run_dir) / TOP_SOLVER, Path(saved["weights"]), Path(run_dir) / saved["net"],
                     Path(saved["weights"]), cut, saved)


def finish(run_dir: Path, cached: CachedRun) -> list[Path]:
    """Replace every top-only caffemodel of the run (snapshots, best.caffemodel) by the full net's."""
    run_dir = Path(run_dir)
    done = []
    candidates = sorted((run_dir / "snapshots").glob("*.caffemodel")) + [run_dir / "best.caffemodel"]
    for path in candidates:
        if path.is_file() and top_net.is_top_only(path, cached.cut):
            top_net.assemble(cached.original_weights, cached.full_net, path, path, cached.cut)
            done.append(path)
    return done


def is_full_net(path: Path, cut: trunk_cut.Cut) -> bool:
    return not top_net.is_top_only(path, cut) and bool(caffemodels.read_layers(path))


# --- the runner's hook ------------------------------------------------------------------------------------------------
def _info(text: str):
    from caffetune.train.events import Notice

    return Notice("info", text)


def _net_file(prepared) -> str:
    names = prepared.solver_fields.get("net") or []
    if len(names) != 1 or any(k in prepared.solver_fields for k in ("train_net", "test_net")):
        raise RunError("--cache-features needs the solver's net in one file (net: train_val.prototxt)",
                       fix="write TRAIN and TEST in one train_val.prototxt named by `net:`, or run without "
                           "--cache-features")
    return names[0]


class CacheHook:
    """RunHook of `run --cache-features` (`insist`: True refuses with the reason, None uses the cache when exact)."""

    def __init__(self, insist: bool | None = None, crops: int = 0):
        self.insist, self.crops = insist, crops
        self.cached: CachedRun | None = None

    def _applicable(self, prepared, launch) -> tuple[str, Message]:
        if prepared.snapshot is not None:
            raise RunError("--cache-features starts from weights, not from a --snapshot of a plain run",
                           fix="drop --snapshot, or run without --cache-features")
        if len(launch.weights) != 1:
            raise RunError("--cache-features needs exactly one --weights caffemodel: the frozen trunk's weights",
                           fix="pass the pretrained weights with --weights, or run without --cache-features")
        name = _net_file(prepared)
        return name, prepared.nets[name]

    def before_launch(self, run_dir: Path, prepared, solver: Message, launch, install, callback):
        try:
            name, net = self._applicable(prepared, launch)
            if self.insist is None:               # on by default only where the cache gives the same run
                reason = decline_reason(net, self.crops)
                if reason:
                    callback(_info(f"feature cache not used: {reason}"))
                    return launch
            self.cached = prepare(run_dir, name, net, solver, launch.weights[0], install, progress=callback,
                                  crops=self.crops)
        except CaffetuneError as error:
            if self.insist:
                raise
            callback(_info(f"feature cache not used: {error.what}"))
            return launch
        for line in summary(self.cached):
            callback(_info(line))
        return replace(launch, solver=self.cached.solver, weights=[self.cached.weights],
                       record=launch.record | {"feature_cache": self.cached.record})

    def before_resume(self, run_dir: Path, launch, install, callback):
        self.cached = load(run_dir)
        if self.cached is None:
            return launch
        rebuild_if_evicted(run_dir, self.cached, install, callback)
        return replace(launch, solver=self.cached.solver)

    def after_run(self, run_dir: Path, callback) -> None:
        if self.cached is None:
            return
        done = finish(run_dir, self.cached)
        if done:
            callback(_info(f"full-net caffemodels (trunk from {self.cached.original_weights.name}): "
                           f"{', '.join(p.name for p in done)}"))


def summary(cached: CachedRun) -> list[str]:
    record, cut = cached.record, cached.cut
    cache = record["cache"]
    pass_text = "reused" if cache["reused"] else f"computed in {cache['pass_seconds']:.1f} s"
    lines = [f"feature cache: frozen trunk of {len(cut.trunk)} layers ({len(cut.frozen)} with weights) runs once; "
             f"caffe trains the top ({', '.join(cut.top)}) on {', '.join(cut.phases['TRAIN'].blobs)}",
             f"feature cache: {feature_cache.describe_bytes(cache['bytes'])} in {cache['folder']} ({pass_text})"]
    return lines + [f"feature cache: {note}" for note in record["notes"]]


def rebuild_if_evicted(run_dir: Path, cached: CachedRun, install, callback) -> None:
    """--resume after the cache was evicted: compute it again (same key, same files the top net names)."""
    top = prototxt.load(Path(run_dir) / TOP_NET)
    sources = [Path(layer.hdf5_data_param.source) for layer in top.layer if layer.type == "HDF5Data"]
    if all(path.is_file() for path in sources):
        return
    callback(_info("feature cache: evicted since the run started; computing it again"))
    net = prototxt.load(cached.full_net)
    solver = prototxt.load(Path(run_dir) / "solver.prototxt", "SolverParameter")
    prepare(Path(run_dir), cached.full_net.name, net, solver, cached.original_weights, install, progress=callback,
            crops=cached.record["cache"].get("crops", 0))
