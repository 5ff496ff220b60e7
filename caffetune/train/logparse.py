"""Caffe training logs -> records. Any iterable of lines in, records and events out, as the lines arrive.

Understands the log of every Caffe since 2014: the iteration line with or without the `(x iter/s, ys/n iters)`
part, `Train net output` / `Test net output` lines (and the older `Test score #k`), the `lr` line, snapshots,
restores and the end of optimization. Values may be `nan`, `-nan`, `inf` or `-inf` (Caffe prints them when
training diverges); they parse to float nan/inf.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

NUMBER = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|nan|inf|infinity)"
_ITERATION_LOSS = re.compile(rf"Iteration (\d+)(?: \([^)]*\))?, loss = ({NUMBER})", re.IGNORECASE)
_LR = re.compile(rf"Iteration (\d+), lr = ({NUMBER})", re.IGNORECASE)
_TESTING = re.compile(r"Iteration (\d+), Testing net(?: \(#(\d+)\))?")
_OUTPUT = re.compile(rf"(Train|Test) net output #(\d+): (\S+) = ({NUMBER})", re.IGNORECASE)
_OLD_SCORE = re.compile(rf"Test score #(\d+): ({NUMBER})", re.IGNORECASE)
_SNAPSHOT = re.compile(r"Snapshotting (solver state )?to (?:binary proto|HDF5) file (\S+)")
_RESTORE = re.compile(r"(?:Restoring previous solver status|Resuming) from (\S+)")
_DONE = re.compile(r"Optimization (Done|stopped early)\.")
_FATAL = re.compile(r"^F\d{4,8} |Check failed|\] Error |terminate called")


def to_float(text: str) -> float:
    """Caffe's printed number; `-nan`, `nan`, `inf` included."""
    try:
        return float(text)
    except ValueError:
        return math.nan


@dataclass
class Record:
    """One display (phase "train": loss, lr and the train net's outputs) or one test pass (phase "test")."""

    phase: str
    iteration: int
    values: dict[str, float] = field(default_factory=dict)
    net: int = 0

    def as_dict(self) -> dict:
        return {"phase": self.phase, "iteration": self.iteration, "net": self.net, **self.values}


@dataclass(frozen=True)
class Event:
    """Something that is not a number: kind is "snapshot", "solverstate", "restore", "done", "stopped" or "fatal"."""

    kind: str
    text: str = ""


class LogParser:
    """Feed lines one at a time; each `feed` returns what those lines completed (records and events)."""

    def __init__(self) -> None:
        self._open: Record | None = None

    def feed(self, line: str) -> list[Record | Event]:
        output = _OUTPUT.search(line) or _OLD_SCORE.search(line)
        if output and self._open is not None:
            self._add_output(output)
            return []
        lr = _LR.search(line)
        if lr and self._open is not None and self._open.phase == "train" and int(lr.group(1)) == self._open.iteration:
            self._open.values["lr"] = to_float(lr.group(2))
            return self._close()
        if lr:  # an lr line with no loss line before it (display of the loss turned off)
            return self._close() + [Record("train", int(lr.group(1)), {"lr": to_float(lr.group(2))})]
        if match := _ITERATION_LOSS.search(line):
            done, self._open = self._close(), Record("train", int(match.group(1)), {"loss": to_float(match.group(2))})
            return done
        if match := _TESTING.search(line):
            done, self._open = self._close(), Record("test", int(match.group(1)), {}, net=int(match.group(2) or 0))
            return done
        events = self._event(line)
        # Other lines (data layer notices, warnings) do not end a record: only the start of something else does.
        return self._close() + events if events else []

    def close(self) -> list[Record | Event]:
        """End of input: whatever record was still open."""
        return self._close()

    def _add_output(self, match: re.Match) -> None:
        if match.re is _OLD_SCORE:
            self._open.values[f"score{match.group(1)}"] = to_float(match.group(2))
            return
        name, value = match.group(3), to_float(match.group(4))
        # The iteration line's (smoothed) loss is what Caffe reports as the loss; an output named "loss" is the
        # same number unless average_loss > 1, so the iteration line wins.
        self._open.values.setdefault(name, value)

    def _close(self) -> list[Record | Event]:
        record, self._open = self._open, None
        return [record] if record is not None and (record.values or record.phase == "train") else []

    @staticmethod
    def _event(line: str) -> list[Event]:
        if match := _SNAPSHOT.search(line):
            return [Event("solverstate" if match.group(1) else "snapshot", match.group(2))]
        if match := _RESTORE.search(line):
            return [Event("restore", match.group(1))]
        if match := _DONE.search(line):
            return [Event("done" if match.group(1) == "Done" else "stopped")]
        if _FATAL.search(line):
            return [Event("fatal", line.rstrip("\n"))]
        return []


def parse_stream(lines: Iterable[str]) -> Iterator[Record | Event]:
    """Records and events of a log, in order, as its lines arrive."""
    parser = LogParser()
    for line in lines:
        yield from parser.feed(line)
    yield from parser.close()


def parse(lines: Iterable[str]) -> list[Record]:
    """Only the records (train displays and test passes) of a whole log."""
    return [item for item in parse_stream(lines) if isinstance(item, Record)]


def is_accuracy(name: str) -> bool:
    """Whether an output is an accuracy ("accuracy", "acc", "loss3/top-1", "accuracy_top5", ...)."""
    lowered = name.lower()
    return "acc" in lowered or "top-" in lowered or "top1" in lowered or "top5" in lowered


def main_accuracy(values: dict[str, float]) -> tuple[str, float] | None:
    """The accuracy to report and rank snapshots by: `accuracy` if present, else the first top-1-like output."""
    names = [name for name in values if is_accuracy(name)]
    if not names:
        return None
    top1 = [n for n in names if "5" not in n.rsplit("/", 1)[-1]] or names
    chosen = "accuracy" if "accuracy" in values else top1[0]
    return chosen, values[chosen]
