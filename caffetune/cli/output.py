"""Everything the CLI shows: the two consoles, JSON, tables, and the progress bars driven by library callbacks.

Results go to stdout (`out`), notes, warnings and progress to stderr (`err`), so `caffetune X --json | jq` works.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager

import click
from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_wide(renderable) -> None:
    """Print a rich table at its natural width, even when that is wider than the terminal (or a pipe's 80 columns)."""
    from rich.measure import Measurement

    needed = Measurement.get(out, out.options.update(width=10_000), renderable).maximum
    terminal = out.width
    out.width = max(terminal, needed)
    try:
        out.print(renderable)
    finally:
        out.width = terminal


def print_columns(rows: list[tuple[str, ...]], to: Console = out) -> None:
    """Plain left-aligned columns (a header row first), two spaces apart; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        to.print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1], markup=False)


def print_fields(rows: list[tuple[str, str]], width: int = 0, to: Console = out) -> None:
    """`key: value` lines with the keys right-aligned (to `width`, at least)."""
    width = max([width] + [len(key) for key, _ in rows])
    for key, value in rows:
        to.print(f"{key:>{width}}: {value}", markup=False)


def rich_table(title: str, columns: list[tuple[str, str, str]], rows: list[list[str]]):
    """A rich table with footers: columns are (header, footer, justify)."""
    from rich.table import Table

    table = Table(title=title, show_footer=True)
    for header, footer, justify in columns:
        table.add_column(header, footer=footer, justify=justify)
    for row in rows:
        table.add_row(*row)
    return table


def warn(text: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {text}")


# --- progress -----------------------------------------------------------------------------------------------------
@contextmanager
def stage_progress():
    """A bar per stage, fed by the library's `progress(stage, done, total)` callback (build-lmdb)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=err, transient=True)
    tasks: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    with bar:
        yield progress


class RunView:
    """The live progress bar of a training run (iteration / max_iter, loss, lr, last test accuracy, ETA), fed by
    the runner's callback; notices are printed above it, and a notice "stage N: ..." starts a new bar."""

    def __init__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  acc {task.fields[acc]}"),
                            TextColumn("ETA {task.fields[eta]}"), console=err, transient=False)
        self.task, self.name = None, "train"
        self.passes: dict = {}

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def _pass(self, item) -> None:
        name = f"features {item.phase}"
        if name not in self.passes:
            self.passes[name] = self.bar.add_task(name, total=item.total, loss="-", lr="-", acc="-", eta="-")
        self.bar.update(self.passes[name], completed=item.done)

    def say(self, line: str) -> None:
        self.bar.console.print(line, markup=False)

    def __call__(self, item) -> None:
        from caffetune.train.runner import Notice
        from caffetune.transfer.feature_cache import PassProgress

        if isinstance(item, PassProgress):      # run --cache-features: the trunk's one pass, a bar per phase
            self._pass(item)
            return
        if isinstance(item, Notice):
            self.bar.console.print(f"[yellow]warning:[/yellow] {item.text}" if item.level == "warning" else item.text)
            if item.text.startswith("stage "):
                self.task, self.name = None, item.text.split(":")[0]   # a new bar for each stage
            return
        number = lambda value, spec: "-" if value is None else format(value, spec)  # noqa: E731
        fields = {"loss": number(item.loss, ".4g"), "lr": number(item.lr, ".3g"),
                  "acc": number(item.test_accuracy, ".4f"),
                  "eta": "-" if item.eta is None else time.strftime("%H:%M:%S", time.gmtime(item.eta))}
        if self.task is None:
            self.task = self.bar.add_task(self.name, total=item.max_iter, **fields)
        self.bar.update(self.task, total=item.max_iter, completed=item.iteration, **fields)
