"""`caffetune eval`: a deploy net and its weights on a labelled dataset, with pycaffe.

The images come from an LMDB (as Caffe's Data layer stores them) or a folder of class folders (labels: the sorted
folder names, as `build-lmdb` numbers them). Preprocessing is Caffe's TEST-phase DataTransformer: an image whose
size differs from the mean file's is first resized to it (the database's stored size), then the mean is
subtracted, the centre crop of the input blob's size is taken, and the result is scaled.
Reports top-1, top-5, per-class accuracy and the confusion matrix (text and PNG).
"""
from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caffetune import files
from caffetune.data import imagelist, lmdb_reader, mean
from caffetune.errors import CaffetuneError, DatasetError, NetError
from caffetune.model import caffe_tools, prototxt

TEXT_MATRIX_LIMIT = 30   # above this many classes the text report lists the largest confusions instead


@dataclass
class Preprocessing:
    mean_file: Path | None = None
    mean_values: list[float] | None = None      # per channel, in the image's channel order (BGR)
    scale: float | None = None

    @classmethod
    def from_options(cls, mean_file=None, mean_values: str | None = None, scale: float | None = None):
        values = [float(v) for v in mean_values.split(",")] if mean_values else None
        return cls(Path(mean_file) if mean_file else None, values, scale)


@dataclass
class EvalReport:
    count: int
    class_names: list[str]
    top1: float
    top5: float
    k: int                                      # the k of "top-5" (fewer when the net has fewer classes)
    confusion: np.ndarray                       # rows: true label, columns: predicted label
    per_class: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"count": self.count, "top1": self.top1, f"top{self.k}": self.top5, "per_class": self.per_class,
                "confusion": self.confusion.tolist(), "class_names": self.class_names}


# --- images -----------------------------------------------------------------------------------------------------
def _is_folder(data: Path) -> bool:
    return data.is_dir() and not (data / "data.mdb").is_file() and any(p.is_dir() for p in data.iterdir())


def iter_labelled_images(data: Path | str, gray: bool = False, limit: int | None = None, start: int = 0,
                         stop: int | None = None) -> tuple[Iterator[tuple[np.ndarray, int]], list[str] | None]:
    """(HxWxC BGR uint8 image, label) from an LMDB or a folder of class folders, and the folder's class names.
    `start`/`stop` select the items [start, stop) of the first `limit`; skipped LMDB records are never decoded."""
    data = Path(data)
    if _is_folder(data):
        listing = imagelist.from_folder(data)
        records = (listing.records[:limit] if limit else listing.records)[start:stop]
        return (_read_image(listing.root / r.path, gray, r.label) for r in records), listing.label_names
    selected = itertools.islice(lmdb_reader.iter_datums(data, limit), start, stop)
    return ((lmdb_reader.image_of(datum, f"{data} (key {key})"), datum.label) for key, datum in selected), None


def describe(data: Path | str, limit: int | None = None) -> tuple[int, list[str] | None]:
    """(images in an LMDB or a folder of class folders, at most `limit`; the folder's class names), in one scan."""
    data = Path(data)
    if _is_folder(data):
        listing = imagelist.from_folder(data)
        count, names = len(listing.records), listing.label_names
    else:
        count, names = lmdb_reader.entry_count(data), None
    return (min(count, limit) if limit else count), names


def _read_image(path: Path, gray: bool, label: int) -> tuple[np.ndarray, int]:
    import cv2  # noqa: PLC0415 - only folder input needs the decoder

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError("not a readable image", where=str(path), fix="remove the file or convert it")
    return (image[:, :, None] if image.ndim == 2 else image), label


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    import cv2  # noqa: PLC0415

    resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return resized[:, :, None] if resized.ndim == 2 else resized


def _centre_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (chw.shape[1] - height) // 2, (chw.shape[2] - width) // 2
    return chw[:, top:top + height, left:left + width]


def transform(image: np.ndarray, input_shape: tuple[int, int, int], pre: Preprocessing,
              mean_chw: np.ndarray | None) -> np.ndarray:
    """One HxWxC image -> the CxHxW float input, as Caffe's TEST-phase DataTransformer computes it."""
    channels, height, width = input_shape
    if image.shape[2] != channels:
        raise DatasetError(f"the images have {image.shape[2]} channel(s) but the net's input has {channels}",
                           fix="rebuild the data with the net's channel count (gray vs color)")
    if mean_chw is not None and image.shape[:2] != mean_chw.shape[1:]:
        image = _resize(image, *mean_chw.shape[1:])
    elif mean_chw is None and (image.shape[0] < height or image.shape[1] < width):
        image = _resize(image, height, width)
    chw = image.transpose(2, 0, 1).astype(np.float32)
    if mean_chw is not None:
        chw = chw - mean_chw
    elif pre.mean_values:
        values = pre.mean_values if len(pre.mean_values) == channels else pre.mean_values[:1] * channels
        chw = chw - np.asarray(values, np.float32)[:, None, None]
    chw = _centre_crop(chw, height, width)
    return chw * pre.scale if pre.scale is not None else chw


# --- the net ----------------------------------------------------------------------------------------------------
def _input_name(net) -> str:
    if not net.inputs:
        raise NetError("the net has no input blob (is this a train_val.prototxt?)",
                       fix="pass a deploy.prototxt (`caffetune rewrite` writes one), whose first layer is Input")
    return net.inputs[0]


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def predict_scores(net, images: Iterator[tuple[np.ndarray, int]], pre: Preprocessing, batch_size: int,
                   mean_chw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(N x classes scores of the net's last output, N labels)."""
    name = _input_name(net)
    input_shape = tuple(net.blobs[name].data.shape[1:])
    output = net.outputs[-1]
    scores, labels = [], []
    for batch in _batches(images, batch_size):
        data = np.stack([transform(image, input_shape, pre, mean_chw) for image, _ in batch])
        net.blobs[name].reshape(*data.shape)
        net.reshape()
        net.blobs[name].data[...] = data
        result = net.forward()[output]
        scores.append(result.reshape(len(batch), -1).copy())
        labels += [label for _, label in batch]
    if not labels:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(scores), np.asarray(labels)


# --- the numbers ------------------------------------------------------------------------------------------------
def score(scores: np.ndarray, labels: np.ndarray, class_names: list[str]) -> EvalReport:
    """Top-1, top-k (k = 5, or the class count), per-class accuracy and the confusion matrix."""
    classes = scores.shape[1]
    if labels.max() >= classes or labels.min() < 0:
        raise DatasetError(f"labels go up to {labels.max()} but the net scores {classes} classes",
                           fix="evaluate with the net fine-tuned for this dataset")
    k = min(5, classes)
    ranked = np.argsort(-scores, axis=1, kind="stable")
    predicted = ranked[:, 0]
    in_top_k = (ranked[:, :k] == labels[:, None]).any(axis=1)
    confusion = np.zeros((classes, classes), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = [{"label": c, "name": class_names[c], "count": int(confusion[c].sum()),
                  "correct": int(confusion[c, c]),
                  "accuracy": float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None}
                 for c in range(classes)]
    return EvalReport(len(labels), class_names, float((predicted == labels).mean()), float(in_top_k.mean()), k,
                      confusion, per_class)


def _class_names(count: int, labels_file, folder_names: list[str] | None) -> list[str]:
    if labels_file:
        names = [line.strip() for line in Path(labels_file).read_text().splitlines() if line.strip()]
    else:
        names = list(folder_names or [])
    return names[:count] + [str(i) for i in range(len(names), count)]


def evaluate(model: Path | str, weights: Path | str, data: Path | str, *, preprocessing: Preprocessing | None = None,
             labels_file: Path | str | None = None, batch_size: int = 32, limit: int | None = None,
             caffe: str | None = None, workers: int | None = None) -> EvalReport:
    """Run a deploy net over a labelled dataset with pycaffe and score it.

    With several cores the images are split into `workers` contiguous shards (default: one per usable core), each
    scored by its own single-threaded pycaffe process: Caffe's CPU convolution loops over the images of a batch and
    threads only the matrix products, so whole processes use the cores better than BLAS threads (about 1.4x on two
    cores). The scores are the same as one process's, in the same order."""
    pre = preprocessing or Preprocessing()
    prototxt.load(model)  # a parse error names file:line:col before pycaffe aborts on it
    install = caffe_tools.find_caffe(caffe)
    count, folder_names = describe(data, limit)
    shards = _shards(count, batch_size, workers or len(os.sched_getaffinity(0)))
    job = (str(model), str(weights), str(data), pre, batch_size, limit, str(install.binary))
    if len(shards) <= 1:
        scores, labels = _score_shard(*job, 0, None, in_process=True)
    else:
        scores, labels = _score_in_processes(job, shards)
    if not len(labels):
        raise DatasetError("no images to evaluate", fix="pass a non-empty LMDB or image folder")
    return score(scores, labels, _class_names(scores.shape[1], labels_file, folder_names))


def _shards(count: int, batch_size: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of whole batches, one per worker (fewer when there are few batches)."""
    batches = -(-count // batch_size)
    workers = max(1, min(workers, batches // 2 or 1))     # a shard of one batch costs more to start than it saves
    bounds = [batches * k // workers * batch_size for k in range(workers + 1)]
    return [(bounds[k], min(bounds[k + 1], count)) for k in range(workers)]


def _score_shard(model: str, weights: str, data: str, pre: Preprocessing, batch_size: int, limit: int | None,
                 binary: str, start: int, stop: int | None, in_process: bool = False) -> tuple[np.ndarray, np.ndarray]:
    if not in_process:
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"   # before libcaffe loads BLAS
    pycaffe = caffe_tools.import_pycaffe(caffe_tools.find_caffe(binary))
    pycaffe.set_mode_cpu()
    net = pycaffe.Net(model, pycaffe.TEST, weights=weights)
    mean_chw = mean.load(pre.mean_file) if pre.mean_file else None
    channels = net.blobs[_input_name(net)].data.shape[1]
    images, _ = iter_labelled_images(data, gray=channels == 1, limit=limit, start=start, stop=stop)
    return predict_scores(net, images, pre, batch_size, mean_chw)


def _score_in_processes(job: tuple, shards: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each shard in a fresh (spawned) process; a Caffe abort in one is an error here, not a hang."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(shards), mp_context=context) as pool:
        futures = [pool.submit(_score_shard_safely, *job, start, stop) for start, stop in shards]
        try:
            results = [future.result() for future in futures]
        except BrokenProcessPool:
            raise NetError("pycaffe aborted while scoring the images (a Caffe CHECK failed)", where=job[0],
                           fix="run `caffetune inspect` on the net and weights, or `caffetune eval --workers 1` "
                               "to see Caffe's own message") from None
    for result in results:
        if isinstance(result, str):
            raise NetError(f"scoring the images failed: {result}", where=job[0])
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])


def _score_shard_safely(*args):
    """A worker's errors come back as their message (typed errors with extra fields do not always unpickle)."""
    try:
        scores, labels = _score_shard(*args)
        return scores, labels
    except (CaffetuneError, OSError, ValueError) as error:
        return str(error)


# --- output -----------------------------------------------------------------------------------------------------
def confusion_text(report: EvalReport) -> str:
    """The confusion matrix as aligned text (rows: true class, columns: predicted)."""
    matrix, names = report.confusion, report.class_names
    if len(names) > TEXT_MATRIX_LIMIT:
        pairs = [(matrix[t, p], names[t], names[p]) for t in range(len(names)) for p in range(len(names))
                 if t != p and matrix[t, p]]
        lines = [f"{count:6d}  {true} -> {pred}" for count, true, pred in sorted(pairs, reverse=True)[:20]]
        return "largest confusions (count  true -> predicted):\n" + "\n".join(lines or ["  none"])
    first = max(len("true\\pred"), *(len(n) for n in names)) + 1
    width = max(6, *(len(n[:12]) + 1 for n in names), len(str(matrix.max())) + 1)
    header = "true\\pred".ljust(first) + "".join(n[:12].rjust(width) for n in names)
    rows = [name.ljust(first) + "".join(str(v).rjust(width) for v in row) for name, row in zip(names, matrix)]
    return "\n".join([header] + rows)


def format_report(report: EvalReport) -> str:
    lines = [f"images: {report.count}", f"top-1 accuracy: {report.top1:.4f}",
             f"top-{report.k} accuracy: {report.top5:.4f}", "", "per class:"]
    for entry in report.per_class:
        if entry["count"]:
            lines.append(f"  {entry['name']:<20} {entry['accuracy']:.4f}  ({entry['correct']}/{entry['count']})")
    return "\n".join(lines + ["", "confusion matrix:", confusion_text(report)])


def confusion_png(report: EvalReport) -> bytes:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from caffetune.train import plots  # noqa: F401,PLC0415 - selects the Agg backend

    size = min(4 + 0.4 * len(report.class_names), 20)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(report.confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if len(report.class_names) <= TEXT_MATRIX_LIMIT:
        ticks = range(len(report.class_names))
        ax.set_xticks(ticks, report.class_names, rotation=90)
        ax.set_yticks(ticks, report.class_names)
        for (row, column), value in np.ndenumerate(report.confusion):
            if value:
                ax.text(column, row, str(value), ha="center", va="center", fontsize="small",
                        color="white" if value > report.confusion.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {report.top1:.4f}, top-{report.k} {report.top5:.4f} ({report.count} images)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(report: EvalReport, folder: Path | str) -> list[Path]:
    """confusion.txt, confusion.png and eval.json in `folder`."""
    folder = Path(folder)
    outputs = {"confusion.txt": format_report(report) + "\n", "confusion.png": confusion_png(report),
               "eval.json": json.dumps(report.as_dict(), indent=2) + "\n"}
    for name, content in outputs.items():
        files.write_atomic(folder / name, content)
    return [folder / name for name in outputs]
