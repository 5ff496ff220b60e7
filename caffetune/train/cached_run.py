"""`run --cache-features`: the pieces a run directory needs to train the top on cached trunk outputs.

    prepare()     find the cut, build or reuse the feature cache (progress per batch), write top.prototxt and
                  top-solver.prototxt into the run directory (and the mirror sequence, when the TRAIN transform
                  mirrors); returns what caffe is started with and what run.json records
    finish()      every top snapshot and best.caffemodel in the run directory becomes a full-net caffemodel

The run directory keeps the user's solver and net copies (what the run means) beside the top net (what caffe ran).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import CaffetuneError
from caffetune.model import caffe_tools, caffemodels, prototxt
from caffetune.transfer import feature_cache, graft, top_net, trunk_cut

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


def decline_reason(net: Message) -> str | None:
    """Why --cache-features would refuse this net (None: it can cache); used to decide the default quietly."""
    try:
        cut = trunk_cut.find_cut(net)
        feature_cache.check_transform(cut)
    except CaffetuneError as error:
        return error.what if hasattr(error, "what") else str(error)
    return None


def prepare(run_dir: Path, net_file: str, net: Message, solver: Message, weights: Path,
            install: caffe_tools.CaffeInstall, progress: Callable[[object], None] | None = None) -> CachedRun:
    """Cache the trunk's outputs and write the top's net and solver into `run_dir` (net_file: the train_val copy)."""
    progress = progress or (lambda item: None)
    cut = trunk_cut.find_cut(net)
    exact = feature_cache.check_transform(cut)
    top_net.check_trunk_weights(weights, net, cut)
    started = time.perf_counter()
    cache = feature_cache.build(net, cut, weights, install, progress=progress)
    sources = {phase: cache.list_file(phase) for phase in cut.phases}
    batches = {phase: cache.phase(phase)["batch"] for phase in cut.phases}
    if exact.mirror:
        rows = feature_cache.sequence_rows(solver, batches["TRAIN"])
        seed = solver.random_seed if solver.HasField("random_seed") else None
        sources["TRAIN"] = feature_cache.write_mirror_sequence(cache, run_dir / SEQUENCE_DIR, rows, seed)
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
