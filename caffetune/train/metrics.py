"""A run's metrics on disk: `metrics.csv` (one row per record, a column per value) and `metrics.jsonl`.

`MetricsWriter` is a context manager. Opened with `resume_from=N` it keeps what an earlier run wrote before
iteration N (the iteration of the snapshot being resumed) and continues after it, so a resumed run's metrics read
as one run.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from caffetune.files import write_atomic
from caffetune.train.logparse import Record

CSV_NAME = "metrics.csv"
JSONL_NAME = "metrics.jsonl"
KEY_COLUMNS = ["phase", "iteration", "net"]


def _json_value(value):
    # JSON has no nan/inf; write them as strings so that every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json_value(value):
    return float(value) if isinstance(value, str) and value in ("nan", "inf", "-inf") else value


def record_to_json(record: Record) -> str:
    return json.dumps({key: _json_value(value) for key, value in record.as_dict().items()})


def record_from_json(line: str) -> Record:
    data = {key: _from_json_value(value) for key, value in json.loads(line).items()}
    return Record(data.pop("phase"), int(data.pop("iteration")), data, int(data.pop("net", 0)))


def read_records(run_dir: Path | str) -> list[Record]:
    """The records a run directory holds (from metrics.jsonl)."""
    path = Path(run_dir) / JSONL_NAME
    if not path.is_file():
        return []
    return [record_from_json(line) for line in path.read_text().splitlines() if line.strip()]


def csv_text(records: list[Record]) -> str:
    """The CSV of a list of records: key columns, then every value name in order of first appearance."""
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record.values))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(KEY_COLUMNS + [name for name in names if name])
    return buffer.getvalue() + "".join(_csv_row(record, names) for record in records)


def _csv_row(record: Record, names) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(
        [record.phase, record.iteration, record.net] + [_csv_value(record.values.get(name)) for name in names])
    return buffer.getvalue()


def _csv_value(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


class MetricsWriter:
    """Appends each record to metrics.jsonl and metrics.csv as it comes; the CSV is rewritten (atomically) only
    when a record brings a new value name, so that it gains a column."""

    def __init__(self, run_dir: Path | str, resume_from: int | None = None):
        self.run_dir = Path(run_dir)
        kept = [r for r in read_records(self.run_dir) if r.iteration < resume_from] if resume_from is not None else []
        self.records: list[Record] = kept
        self.columns: dict[str, None] = {}
        self._jsonl = self._csv = None

    def __enter__(self) -> MetricsWriter:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.run_dir / JSONL_NAME, "".join(record_to_json(r) + "\n" for r in self.records))
        self._jsonl = open(self.run_dir / JSONL_NAME, "a")
        self._rewrite_csv()
        return self

    def write(self, record: Record) -> None:
        self.records.append(record)
        self._jsonl.write(record_to_json(record) + "\n")
        self._jsonl.flush()
        if any(name not in self.columns for name in record.values):
            self._rewrite_csv()
        else:
            self._csv.write(_csv_row(record, self.columns))
            self._csv.flush()

    def _rewrite_csv(self) -> None:
        if self._csv is not None:
            self._csv.close()
        text = csv_text(self.records)
        self.columns = dict.fromkeys(text.split("\n", 1)[0].split(",")[len(KEY_COLUMNS):])
        write_atomic(self.run_dir / CSV_NAME, text)
        self._csv = open(self.run_dir / CSV_NAME, "a")

    def __exit__(self, *exc) -> None:
        self._jsonl.close()
        self._csv.close()
