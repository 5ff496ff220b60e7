"""`caffetune build-lmdb`: image list -> train/val LMDBs of Datums, labels, list files, mean and a summary.

Stages: plan (labels checked, seeded shuffle, stratified split) -> convert (worker processes read, decode, resize,
serialize Datums and sum pixels for the mean; Datums come back through shared memory, a bounded window of chunks
in flight) -> write (one LmdbWriter per split, keys `%08d_<relpath>` numbered in written order). Everything is
written into a temporary folder beside OUT and renamed onto OUT at the end, so OUT is either the whole dataset or
absent.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from caffetune import __version__, files
from caffetune.data import imagelist, mean
from caffetune.data.datum import ImageOptions, UnreadableImage, convert
from caffetune.data.imagelist import ImageList, Record
from caffetune.data.lmdb_writer import (
    LmdbWriter,
    check_target,
    make_key,
    remove_stale_siblings,
    replace_path,
    temporary_sibling,
)
from caffetune.data.mean import MeanAccumulator, PixelSum
from caffetune.data.worker_pool import OrderedPool, WorkerDied, keep_freed_memory
from caffetune.errors import DatasetError

Progress = Callable[[str, int, int], None]      # (stage, done, total)
CHUNK = 16                                     # images per task sent to a worker


@dataclass(frozen=True)
class BuildOptions:
    image: ImageOptions = ImageOptions()
    val_fraction: float = 0.0
    seed: int = 0
    shuffle: bool = True
    remap_labels: bool = False
    strict: bool = False
    overwrite: bool = False
    workers: int = 0                 # 0: one per CPU core; 1: no worker processes


@dataclass
class SplitResult:
    name: str
    written: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    db_bytes: int = 0
    map_growths: int = 0


@dataclass
class BuildSummary:
    out: str
    source: str
    labels: list[str]
    splits: dict[str, SplitResult]
    skipped: list[tuple[str, str]]
    conversions: dict[str, int]
    shape: list[int] | None           # C, H, W when every image has one shape
    mean_value: list[float] | None
    mean_problem: str | None
    seconds: float
    options: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return sum(s.written for s in self.splits.values())

    def as_dict(self) -> dict:
        data = asdict(self)
        data["skipped"] = {"count": len(self.skipped), "reasons": dict(Counter(r for _, r in self.skipped)),
                           "report": "skipped.tsv" if self.skipped else None}
        data["images"] = self.images
        data["images_per_second"] = round(self.images / self.seconds, 1) if self.seconds else None
        data["caffetune_version"] = __version__
        return data


# --- plan ------------------------------------------------------------------------------------------------------

def plan(image_list: ImageList, options: BuildOptions) -> dict[str, list[Record]]:
    """Records of each split in the order they will be written."""
    if not 0 <= options.val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {options.val_fraction}",
                           fix="use e.g. --val-fraction 0.2")
    records = image_list.records
    if options.val_fraction > 0:
        train, val = imagelist.split(records, options.val_fraction, options.seed)
        splits = {"train": train, "val": val}
    else:
        splits = {"train": list(records)}
    if options.shuffle:
        splits = {name: imagelist.shuffled(part, options.seed + index) for index, (name, part)
                  in enumerate(splits.items())}
    return splits


# --- convert (runs in worker processes) ------------------------------------------------------------------------

@dataclass
class Item:
    record: Record
    datum: bytes | None = None
    reason: str | None = None
    conversions: tuple[str, ...] = ()
    shape: tuple[int, int, int] | None = None      # H, W, C


@dataclass
class Chunk:
    items: list[Item]
    sums: list[PixelSum]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except IsADirectoryError:
        raise UnreadableImage("is a folder") from None
    except PermissionError:
        raise UnreadableImage("permission denied") from None
    except OSError as error:
        raise UnreadableImage(f"cannot read: {error.strerror or error}") from None


def convert_chunk(root: Path, records: list[Record], options: ImageOptions, want_mean: bool) -> Chunk:
    """Read, decode, resize and serialize a few images; sum their pixels for the mean (in this worker)."""
    items, sums = [], {}
    for record in records:
        try:
            converted = convert(record.path, _read(root / record.path), record.label, options)
        except UnreadableImage as error:
            items.append(Item(record, reason=error.reason))
            continue
        image = converted.image
        items.append(Item(record, converted.datum, conversions=tuple(converted.conversions), shape=image.shape))
        if want_mean:
            if image.shape in sums:
                sums[image.shape].add(image)
            else:
                sums[image.shape] = PixelSum.of(image, dtype="uint32")
    return Chunk(items, list(sums.values()))


def _quiet_worker() -> None:
    """Worker setup: one OpenCV thread each (the pool is the parallelism); Ctrl-C and SIGTERM are the parent's to
    handle (it terminates the pool), so workers print no tracebacks."""
    import signal  # noqa: PLC0415

    import cv2  # noqa: PLC0415

    cv2.setNumThreads(1)
    keep_freed_memory()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_count(asked: int, images: int) -> int:
    """`asked`, or one per CPU this process may use; never more than there are chunks of work."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(asked or available, -(-images // CHUNK)))


def _convert_for_pool(root: Path, records: list[Record], options: ImageOptions, want_mean: bool):
    """convert_chunk with the Datums split off as payloads, so they travel through shared memory."""
    chunk = convert_chunk(root, records, options, want_mean)
    datums = [item.datum for item in chunk.items]
    for item in chunk.items:
        item.datum = None
    return datums, chunk


class Converter:
    """Runs convert_chunk over a split in order: in this process (one worker), or in worker processes with a
    bounded number of chunks in flight and Datums returned through shared memory."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = OrderedPool(workers, initializer=_quiet_worker) if workers > 1 else None

    def run(self, root: Path, records: list[Record], options: ImageOptions, want_mean: bool) -> Iterator[Chunk]:
        chunks = (records[start:start + CHUNK] for start in range(0, len(records), CHUNK))
        if self._pool is None:
            for chunk in chunks:
                yield convert_chunk(root, chunk, options, want_mean)
            return
        tasks = ((root, chunk, options, want_mean) for chunk in chunks)
        try:
            for datums, chunk in self._pool.map(_convert_for_pool, tasks):
                for item, datum in zip(chunk.items, datums):
                    item.datum = datum
                yield chunk
        except WorkerDied as died:
            first = died.task[1][0].path
            raise DatasetError(f"a worker process died while decoding one of {len(died.task[1])} files starting "
                               f"with {first}", where=str(root),
                               fix="rerun with --workers 1 to find the file that crashes OpenCV, and remove it") \
                from None

    def close(self, kill: bool = False) -> None:
        if self._pool is not None:
            self._pool.close(kill=kill)


# --- write -----------------------------------------------------------------------------------------------------

@dataclass
class _Tally:
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)
    accumulator: MeanAccumulator = field(default_factory=MeanAccumulator)
    shapes: set = field(default_factory=set)


def _write_split(name: str, records: list[Record], image_list: ImageList, work: Path, options: BuildOptions,
                 converter: Converter, tally: _Tally, progress: Progress) -> tuple[SplitResult, list[Record]]:
    result, written, per_class = SplitResult(name), [], Counter()
    with LmdbWriter(work / f"{name}_lmdb") as db:
        done = 0
        for chunk in converter.run(image_list.root, records, options.image, want_mean=name == "train"):
            for item in chunk.items:
                if item.datum is None:
                    if options.strict:
                        raise DatasetError(f"unusable image: {item.reason}", where=str(image_list.root /
                                           item.record.path), fix="remove or fix the file, or drop --strict "
                                           "to skip such files (they are listed in skipped.tsv)")
                    tally.skipped.append((item.record.path, item.reason))
                    continue
                db.put(make_key(len(written), item.record.path), item.datum)
                written.append(item.record)
                per_class[image_list.label_names[item.record.label]] += 1
                tally.conversions.update(item.conversions)
                tally.shapes.add(item.shape)
            for part in chunk.sums:
                tally.accumulator.merge(part)
            done += len(chunk.items)
            progress(name, done, len(records))
    result.written, result.map_growths = len(written), db.map_growths
    result.per_class = {n: per_class[n] for n in image_list.label_names if per_class[n]}
    result.db_bytes = (work / f"{name}_lmdb" / "data.mdb").stat().st_size
    return result, written


def _write_side_files(work: Path, image_list: ImageList, lists: dict[str, list[Record]], tally: _Tally) -> None:
    files.write_atomic(work / "labels.txt", _file_bytes("".join(f"{name}\n" for name in image_list.label_names)))
    for name, records in lists.items():
        files.write_atomic(work / f"{name}.txt", _file_bytes(imagelist.format_list(records)))
    if tally.skipped:
        report = "path\treason\n" + "".join(f"{_tsv(path)}\t{_tsv(reason)}\n" for path, reason in tally.skipped)
        files.write_atomic(work / "skipped.tsv", _file_bytes(report))


def _tsv(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _file_bytes(text: str) -> bytes:
    """UTF-8, with file names that are not UTF-8 written back as their original bytes (as the file system has them)."""
    return text.encode("utf-8", "surrogateescape")


def _options_record(options: BuildOptions, image_list: ImageList) -> dict:
    record = asdict(options)
    record["image"]["resize"] = "x".join(map(str, options.image.resize)) if options.image.resize else None
    record["source"] = image_list.source
    return record


def _nothing(stage: str, done: int, total: int) -> None:
    pass


def build(image_list: ImageList, out: Path | str, options: BuildOptions = BuildOptions(),
          progress: Progress = _nothing) -> BuildSummary:
    """Build the dataset folder `out` (train_lmdb, val_lmdb, labels.txt, list files, mean, summary.json)."""
    out = Path(out).absolute()
    check_target(out, options.overwrite)
    image_list = imagelist.check_labels(image_list, remap=options.remap_labels)
    splits = plan(image_list, options)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    work = temporary_sibling(out)
    work.mkdir()
    converter = None
    try:
        converter = Converter(worker_count(options.workers, sum(map(len, splits.values()))))
        tally, results, lists = _Tally(skipped=list(image_list.ignored)), {}, {}
        for name, records in splits.items():
            results[name], lists[name] = _write_split(name, records, image_list, work, options, converter, tally,
                                                      progress)
        converter.close()
        summary = _finish(work, out, image_list, options, results, lists, tally, started)
        replace_path(work, out)
        return summary
    except BaseException:
        if converter is not None:
            converter.close(kill=True)
        shutil.rmtree(work, ignore_errors=True)
        raise


def _finish(work: Path, out: Path, image_list: ImageList, options: BuildOptions, results: dict, lists: dict,
            tally: _Tally, started: float) -> BuildSummary:
    if results["train"].written == 0:
        example = f" (e.g. {tally.skipped[0][0]}: {tally.skipped[0][1]})" if tally.skipped else ""
        raise DatasetError(f"no usable image in the training set: all were skipped{example}",
                           where=image_list.source,
                           fix=f"check that the paths are relative to the root {image_list.root} (--root)")
    _write_side_files(work, image_list, lists, tally)
    problem = tally.accumulator.problem()
    values = None if problem else mean.write(tally.accumulator.mean_chw(), work / "mean.binaryproto",
                                             work / "mean.json")
    shape = None if len(tally.shapes) != 1 else [next(iter(tally.shapes))[i] for i in (2, 0, 1)]
    summary = BuildSummary(out=str(out), source=image_list.source, labels=image_list.label_names, splits=results,
                           skipped=tally.skipped, conversions=dict(tally.conversions), shape=shape,
                           mean_value=values, mean_problem=problem,
                           seconds=round(time.perf_counter() - started, 3),
                           options=_options_record(options, image_list))
    summary.warnings = _warnings(summary)
    files.write_atomic(work / "summary.json", json.dumps(summary.as_dict(), indent=2, default=str) + "\n")
    return summary


def _warnings(summary: BuildSummary) -> list[str]:
    """Things that build fine but will bite at training time."""
    found = []
    if len(summary.labels) < 2:
        found.append("only one class: a classifier learns nothing from it")
    for name, split in summary.splits.items():
        if split.written == 0:
            found.append(f"{name}_lmdb is empty (classes with fewer than 2 images stay in train): Caffe cannot "
                         f"read an empty database; drop --val-fraction or add images")
        missing = [n for n in summary.labels if n not in split.per_class]
        if split.written and missing and name == "train":
            found.append(f"classes with no image in train_lmdb: {', '.join(missing[:5])}")
    if summary.mean_problem:
        found.append(f"no mean.binaryproto: {summary.mean_problem}")
    return found
