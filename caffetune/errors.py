"""Typed errors. The library raises these; only the CLI turns them into a message and an exit code."""
from __future__ import annotations

from dataclasses import dataclass


class CaffetuneError(Exception):
    """A user-facing problem: says what went wrong, where, and how to fix it."""

    exit_code = 1       # caffetune.cli.exit_codes.ExitCode.FAILED

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what)
        self.what = what
        self.where = where
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        return f"{text}\n  fix: {self.fix}" if self.fix else text


class SchemaError(CaffetuneError):
    """caffe.proto could not be found or compiled."""


class PrototxtError(CaffetuneError):
    """A prototxt (or binary proto) file does not parse through the schema."""


class NetError(CaffetuneError):
    """A net is well-formed protobuf but not usable for the requested operation."""


class CaffeNotFound(CaffetuneError):
    """No Caffe binary or pycaffe was found."""

    exit_code = 3       # ExitCode.CAFFE_NOT_FOUND


class DatasetError(CaffetuneError):
    """Images, list files or databases are unusable."""


class PreflightError(CaffetuneError):
    """One or more checks failed before launching Caffe."""

    def __init__(self, problems: list[Problem]):
        errors = sum(1 for p in problems if p.level == "error")
        warnings = len(problems) - errors
        counts = f"{errors} error(s)" + (f" and {warnings} warning(s) (--strict)" if warnings else "")
        super().__init__(f"{counts} found before launching caffe")
        self.problems = problems

    def __str__(self) -> str:
        return "\n".join([self.what] + [f"- {p}" for p in self.problems])


class RunError(CaffetuneError):
    """caffe train failed or was stopped by a watchdog."""


@dataclass(frozen=True)
class Problem:
    """One finding of a check: what is wrong, where, and the fix; why it matters. An "error" stops the run; a
    "warning" (very likely a mistake) lets it start unless --strict."""

    what: str
    where: str = ""
    fix: str = ""
    why: str = ""
    level: str = "error"

    def __str__(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        text = f"{text}: {self.why}" if self.why else text
        return f"{text} (fix: {self.fix})" if self.fix else text


class DownloadError(CaffetuneError):
    """A pretrained model could not be downloaded, or its checksum does not match the pinned one."""


class DivergedError(RunError):
    """The run's watchdog stopped caffe: the loss became NaN/inf or stuck at -log(FLT_MIN) (the net diverged)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None, iteration: int | None = None):
        super().__init__(what, where=where, fix=fix)
        self.iteration = iteration      # the iteration of the display that tripped the watchdog


class RunInterrupted(RunError):
    """caffe train was stopped by Ctrl-C before it could write a snapshot."""

    exit_code = 130     # ExitCode.INTERRUPTED


class SweepError(CaffetuneError):
    """A hyperparameter sweep cannot start or continue: a bad --param, a study of another shape, its storage."""
