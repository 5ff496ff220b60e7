"""caffetune's exit statuses, by name. Scripts may rely on them; docs/development.md lists them."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1              # a CaffetuneError: the message says what, where and the fix
    WOULD_CHANGE = 1        # `rewrite --check`: the outputs differ from the files on disk
    USAGE = 2               # click: a bad option or argument
    CAFFE_NOT_FOUND = 3     # no usable Caffe binary or pycaffe (`doctor` found a problem)
    INTERRUPTED = 130       # Ctrl-C (128 + SIGINT); a run can be resumed
    TERMINATED = 143        # SIGTERM (128 + SIGTERM)


def for_error(error) -> ExitCode:
    """The exit status of a CaffetuneError (its class says which: see caffetune.errors)."""
    try:
        return ExitCode(error.exit_code)
    except ValueError:
        return ExitCode.FAILED
