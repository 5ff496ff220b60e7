"""Preflight checks of HDF5Data layers: the source list, the files it names, and their datasets.

HDF5Data's source is a text file listing .h5 files, one per line, opened from caffe's working directory (the run
directory under `caffetune run`). Caffe loads, for each top of the layer, the dataset of that name; all of them must
have the same number of rows. Cost: at most MAX_LINES lines of the list; the files are stat()ed; the dataset names,
shapes and types (metadata only, no data) of at most MAX_FILES files are read with h5py.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf.message import Message

from caffetune.errors import Problem
from caffetune.train.checks_common import error

MAX_LINES = 10000
MAX_FILES = 20


def check_hdf5_source(layer: Message, where: str, limit: int = MAX_LINES) -> list[Problem]:
    """HDF5Data's source is a text file listing .h5 files (one per line), read from caffe's working directory (the
    run directory). Reads at most `limit` lines; only stat()s the files."""
    source = Path(layer.hdf5_data_param.source)
    if not source.is_file():
        return [error(f"HDF5Data source {source} does not exist", where, "write a text file listing the .h5 files, "
                      "one absolute path per line, and point source at it",
                      "caffe aborts with `Failed to open source file`")]
    with open(source, "rb") as handle:
        if handle.read(8) == b"\x89HDF\r\n\x1a\n":
            return [error(f"HDF5Data source {source} is an HDF5 file, not the list of HDF5 files caffe expects",
                          where, f"write its absolute path into a text file (echo {source.resolve()} > "
                          f"{source.with_suffix('.txt').name}) and set source to that file",
                          "caffe reads source as text lines naming .h5 files: it aborts with `Failed opening HDF5 "
                          "file` on a line of binary")]
    lines = []
    with open(source, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if number > limit:
                break
            if line.strip():
                lines.append((number, line.strip()))
    relative = [(number, name) for number, name in lines if not Path(name).is_absolute()]
    missing = [(number, name) for number, name in lines if Path(name).is_absolute() and not Path(name).is_file()]
    if not lines:
        return [error(f"HDF5Data source {source} lists no file", where, "list the .h5 files, one per line",
                      "caffe aborts with `Must have at least 1 HDF5 filename listed`")]
    for found, what in ((relative, "relative paths (caffe reads them from the run directory it is started in)"),
                        (missing, "files that do not exist")):
        if found:
            number, name = found[0]
            return [error(f"{len(found)} of the {len(lines)} files listed in {source} are {what}: e.g. "
                          f"{source}:{number}: {name}", where, "write the absolute path of each .h5 file",
                          "caffe aborts with `Failed opening HDF5 file` when it reaches one")]
    return check_datasets(layer, [Path(name) for _number, name in lines[:MAX_FILES]], where)


def check_datasets(layer: Message, paths: list[Path], where: str) -> list[Problem]:
    """Each top of the layer must be a dataset of every file, of numbers, with the same number of rows."""
    import h5py

    tops = list(layer.top)
    for path in paths:
        try:
            with h5py.File(path, "r") as handle:
                missing = [top for top in tops if not isinstance(handle.get(top), h5py.Dataset)]
                if missing:
                    names = ", ".join(sorted(handle.keys())) or "none"
                    return [error(f"{path} has no dataset named {', '.join(missing)} (its datasets: {names})",
                                  where, "name the datasets after the layer's tops (top: \"data\" reads dataset "
                                  "data), or rename the tops",
                                  f"caffe loads one dataset per top and stops with `Failed to find HDF5 dataset "
                                  f"{missing[0]}`")]
                kinds = {top: handle[top].dtype.kind for top in tops}
                rows = {top: handle[top].shape[0] if handle[top].shape else 0 for top in tops}
        except OSError as failure:
            return [error(f"{path} is not a readable HDF5 file: {failure}", where, "write it again with h5py",
                          "caffe aborts with `Failed opening HDF5 file`")]
        odd = [top for top, kind in kinds.items() if kind not in "fiub"]
        if odd:
            return [error(f"dataset {odd[0]} of {path} holds {kinds[odd[0]]!r}-kind values, not numbers", where,
                          "store float32 arrays (labels too)", "caffe stops with `Unsupported datatype class`")]
        if len(set(rows.values())) > 1:
            shown = ", ".join(f"{top} {count}" for top, count in rows.items())
            return [error(f"the datasets of {path} have different numbers of rows ({shown})", where,
                          "store one row per example in every dataset (data N x C x H x W, label N)",
                          "caffe stops with `Check failed: hdf_blobs_[i]->shape(0) == num`")]
    return []
