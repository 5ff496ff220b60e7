"""What a training run reports to its caller while it runs: notices and progress, through one callback."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Notice:
    """A message for the user (the CLI prints it): level is "info" or "warning"."""

    level: str
    text: str


@dataclass(frozen=True)
class Progress:
    iteration: int
    max_iter: int
    loss: float | None
    lr: float | None
    test_accuracy: float | None
    elapsed: float
    eta: float | None


Callback = Callable[[object], None]     # receives Notice and Progress items


def quiet(_item) -> None:
    """A callback that shows nothing."""
