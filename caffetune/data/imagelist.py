"""Image lists: a folder of class folders, a Caffe list file or a CSV -> records and label names; labels checked
to be 0..N-1; seeded shuffles and a stratified train/val split."""
from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from caffetune.errors import DatasetError

_PATH_COLUMNS = ("path", "relpath", "file", "filename", "image", "image_path")
_LABEL_COLUMNS = ("label", "class", "category", "class_id", "label_id")


@dataclass(frozen=True)
class Record:
    """One image: its path relative to the root (as keys and list files name it) and its label."""

    path: str
    label: int


@dataclass
class ImageList:
    """Records of a dataset, their root folder and the name of each label (index = label)."""

    root: Path
    records: list[Record]
    label_names: list[str]
    source: str
    ignored: list[tuple[str, str]] = field(default_factory=list)     # (path, reason) found while scanning


# --- a folder of class folders ---------------------------------------------------------------------------------

def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _files_under(folder: Path) -> list[Path]:
    """Every regular, non-hidden file below `folder`, in a stable order (hidden folders are not entered)."""
    found = []
    for directory, subdirectories, files in os.walk(folder, followlinks=True):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        found += [Path(directory) / name for name in sorted(files) if not name.startswith(".")]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def from_folder(folder: Path | str) -> ImageList:
    """Labels are the sorted class folder names -> 0..N-1; every file inside a class folder is a record."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError("image folder not found", where=str(folder),
                           fix="pass a folder holding one sub-folder per class, or --list FILE --root DIR")
    entries = sorted(p for p in folder.iterdir() if _visible(p))
    class_folders = [p for p in entries if p.is_dir()]
    ignored = [(p.name, "not inside a class folder") for p in entries if not p.is_dir()]
    records, names = [], []
    for class_folder in class_folders:
        files = _files_under(class_folder)
        broken = [f for f in files if "\n" in f.name or "\r" in f.name]
        ignored += [(f.relative_to(folder).as_posix(), "line break in the file name: a list file cannot name it")
                    for f in broken]
        files = [f for f in files if f not in broken]
        if not files:
            ignored.append((f"{class_folder.name}/", "empty class folder: not used as a class"))
            continue
        names.append(class_folder.name)
        records += [Record(f.relative_to(folder).as_posix(), len(names) - 1) for f in files]
    if not records:
        raise DatasetError("no class folders with files found", where=str(folder),
                           fix="put the images of each class in a sub-folder named for the class (cat/1.jpg, ...)")
    return ImageList(root=folder, records=records, label_names=names, source=f"folder {folder}", ignored=ignored)


# --- a Caffe list file -----------------------------------------------------------------------------------------

def parse_list_line(line: str, where: str) -> Record:
    """`relpath label`, split at the last space as convert_imageset does (tabs are accepted too)."""
    text = line.strip()
    path, _, label = text.replace("\t", " ").rpartition(" ")
    path = text[:len(path)].rstrip()
    if not path:
        raise DatasetError(f"expected `relpath label`, got {text!r}", where=where,
                           fix="write one image per line: the path relative to --root, a space, an integer label")
    try:
        return Record(path, int(label))
    except ValueError:
        raise DatasetError(f"label {label!r} is not an integer", where=where,
                           fix="labels in a Caffe list file are integers 0..N-1 after the last space") from None


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError("list file not found", where=str(path), fix="check the --list path") from None
    except UnicodeDecodeError:
        raise DatasetError("list file is not UTF-8 text", where=str(path), fix="pass a text list file") from None


def _check_root(root: Path | str | None, list_path: Path) -> Path:
    root = Path(root) if root is not None else list_path.parent
    if not root.is_dir():
        raise DatasetError("root folder not found", where=str(root),
                           fix="pass --root DIR, the folder the list file's paths are relative to")
    return root


def from_list_file(list_file: Path | str, root: Path | str | None = None) -> ImageList:
    """A Caffe list file (`relpath label` per line); paths are relative to `root` (default: the list's folder)."""
    list_path = Path(list_file)
    lines = _read_lines(list_path)
    root_path = _check_root(root, list_path)
    records = [parse_list_line(line, f"{list_path}:{number}")
               for number, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise DatasetError("list file has no entries", where=str(list_path), fix="add `relpath label` lines")
    names = [str(label) for label in sorted({r.label for r in records})]
    return ImageList(root=root_path, records=records, label_names=names, source=f"list {list_path}")


# --- a CSV -----------------------------------------------------------------------------------------------------

def _csv_columns(header: list[str], where: str) -> tuple[int, int]:
    lowered = [name.strip().lower() for name in header]
    path_column = next((lowered.index(n) for n in _PATH_COLUMNS if n in lowered), None)
    label_column = next((lowered.index(n) for n in _LABEL_COLUMNS if n in lowered), None)
    if path_column is None or label_column is None:
        raise DatasetError(f"CSV header {header} names no path and label columns", where=where,
                           fix=f"name the columns e.g. `path,label` (path: one of {', '.join(_PATH_COLUMNS)}; "
                               f"label: one of {', '.join(_LABEL_COLUMNS)}), or write no header: path first")
    return path_column, label_column


def _is_int(text: str) -> bool:
    try:
        int(text)
        return True
    except ValueError:
        return False


def from_csv(csv_file: Path | str, root: Path | str | None = None) -> ImageList:
    """A CSV of `path,label` (header optional). Integer labels are used as they are; class names are sorted ->
    0..N-1."""
    csv_path = Path(csv_file)
    rows = [row for row in csv.reader(_read_lines(csv_path)) if any(cell.strip() for cell in row)]
    if not rows:
        raise DatasetError("CSV has no rows", where=str(csv_path), fix="add `path,label` rows")
    has_header = any(cell.strip().lower() in _PATH_COLUMNS + _LABEL_COLUMNS for cell in rows[0])
    path_column, label_column = _csv_columns(rows[0], f"{csv_path}:1") if has_header else (0, 1)
    body = rows[1:] if has_header else rows
    first_line = 2 if has_header else 1
    pairs = []
    for number, row in enumerate(body, first_line):
        if len(row) <= max(path_column, label_column):
            raise DatasetError(f"row has {len(row)} column(s)", where=f"{csv_path}:{number}",
                               fix="each row needs a path and a label")
        pairs.append((row[path_column].strip(), row[label_column].strip()))
    root_path = _check_root(root, csv_path)
    if all(_is_int(label) for _, label in pairs):
        records = [Record(path, int(label)) for path, label in pairs]
        names = [str(label) for label in sorted({r.label for r in records})]
    else:
        names = sorted({label for _, label in pairs})
        index = {name: i for i, name in enumerate(names)}
        records = [Record(path, index[label]) for path, label in pairs]
    return ImageList(root=root_path, records=records, label_names=names, source=f"csv {csv_path}")


# --- labels ----------------------------------------------------------------------------------------------------

def label_problem(labels: set[int]) -> str | None:
    """Why a label set is not 0..N-1 (what Caffe's SoftmaxWithLoss and Accuracy expect), or None."""
    expected = set(range(len(labels)))
    if labels == expected:
        return None
    if min(labels) < 0:
        return f"negative labels ({sorted(labels)[:5]}...); Caffe needs 0..N-1"
    if min(labels) > 0:
        return (f"labels start at {min(labels)}, not 0: a classifier of N outputs would never be trained on "
                f"label 0 and would crash on label N")
    missing = sorted(expected - labels)
    return f"labels are not contiguous (missing {missing[:10]}{'...' if len(missing) > 10 else ''})"


def remap_table(labels: set[int]) -> dict[int, int]:
    return {old: new for new, old in enumerate(sorted(labels))}


def check_labels(image_list: ImageList, remap: bool = False) -> ImageList:
    """The list unchanged when its labels are 0..N-1; remapped (sorted) when `remap`; else a DatasetError."""
    labels = {r.label for r in image_list.records}
    problem = label_problem(labels)
    if problem is None:
        return image_list
    table = remap_table(labels)
    if not remap:
        shown = ", ".join(f"{old}->{new}" for old, new in list(table.items())[:8])
        raise DatasetError(problem, where=image_list.source,
                           fix=f"pass --remap-labels to map the {len(table)} labels in order ({shown}"
                               f"{', ...' if len(table) > 8 else ''}); labels.txt records the original labels")
    records = [replace(r, label=table[r.label]) for r in image_list.records]
    names = [str(old) for old in sorted(labels)]
    return replace(image_list, records=records, label_names=names)


# --- order and split -------------------------------------------------------------------------------------------

def shuffled(records: list[Record], seed: int) -> list[Record]:
    """A seeded shuffle (Caffe's Data layer reads in key order, so the order written is the order trained)."""
    result = list(records)
    random.Random(seed).shuffle(result)
    return result


def _val_count(size: int, fraction: float) -> int:
    """Per class: round(size * fraction), but at least one for val and one left for train when the class has 2+."""
    if fraction <= 0 or size < 2:
        return 0
    return min(size - 1, max(1, round(size * fraction)))


def split(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Stratified, seeded train/val split: each class keeps (about) the same share in both."""
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}", fix="use e.g. --val-fraction 0.2")
    by_label: dict[int, list[Record]] = defaultdict(list)
    for record in records:
        by_label[record.label].append(record)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        members = sorted(by_label[label], key=lambda r: r.path)
        rng.shuffle(members)
        count = _val_count(len(members), val_fraction)
        val += members[:count]
        train += members[count:]
    return train, val


def format_list(records: list[Record]) -> str:
    """Caffe list file text: `relpath label` per line."""
    return "".join(f"{r.path} {r.label}\n" for r in records)


def load(source: Path | str | None = None, *, list_file: Path | str | None = None, csv_file: Path | str | None = None,
         root: Path | str | None = None) -> ImageList:
    """The image list from exactly one input: a folder of class folders, a list file, or a CSV (by suffix when
    SOURCE is a file)."""
    given = [x for x in (source, list_file, csv_file) if x is not None]
    if len(given) != 1:
        raise DatasetError("give exactly one input: SOURCE (a folder of class folders), --list FILE or --csv FILE",
                           fix="e.g. `caffetune build-lmdb photos/ -o data/` or `--list train.txt --root photos/`")
    if source is not None and Path(source).is_dir():
        if root is not None:
            raise DatasetError("--root applies to --list and --csv, not to a folder of class folders",
                               fix="drop --root, or pass the list file with --list")
        return from_folder(source)
    if csv_file is not None or (source is not None and Path(source).suffix.lower() == ".csv"):
        return from_csv(csv_file or source, root)
    if source is not None and not Path(source).exists():
        raise DatasetError("input not found", where=str(source),
                           fix="pass a folder of class folders, or --list FILE --root DIR")
    return from_list_file(list_file or source, root)
