"""Everything the CLI shows: the two consoles, JSON, tables, and the progress bars driven by library callbacks.

Results go to stdout (`out`), notes, warnings and progress to stderr (`err`), so `caffetune X --json | jq` works.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

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


# --- inspect: the net and weights tables ---------------------------------------------------------------------------
_STATE_STYLE = {"frozen": "blue", "fine-tuned": "green", "new": "bold magenta"}
_WEIGHTS_STYLE = {"copied": "green", "scratch": "yellow", "mismatched": "bold red", "partial": "cyan"}


def inspection_tables(report) -> tuple[object, list[str]]:
    """(rich table, summary lines) of an inspection.NetReport or WeightsReport."""
    from caffetune.report.inspection import WeightsReport

    if isinstance(report, WeightsReport):
        return weights_table(report), weights_summary(report)
    return net_table(report), net_summary(report)


def _mults(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values) if values else ""


def net_table(report):
    from rich.table import Table

    from caffetune.report.inspection import format_count, shape_text

    with_weights = report.weights is not None
    table = Table(title=f"{report.name or Path(report.path).name} ({report.phase}; shapes from "
                        f"{report.shape_source})", title_justify="left")
    for column in ("layer", "type", "bottoms -> tops", "output", "params", "count", "lr/decay", "state") + (
            ("weights",) if with_weights else ()):
        table.add_column(column, justify="right" if column == "count" else "left", overflow="fold")
    for row in report.layers:
        state = row.state + (" (head)" if row.head else "")
        style = _STATE_STYLE.get(row.state, "")
        cells = [row.name, row.type, f"{', '.join(row.bottoms)} -> {', '.join(row.tops)}",
                 ", ".join(shape_text(s) for s in row.outputs),
                 "?" if row.params is None else ", ".join(shape_text(s) for s in row.params),
                 format_count(row.param_count) if row.params != [] else "",
                 f"{_mults(row.lr_mult)} {_mults(row.decay_mult)}".strip(),
                 f"[{style}]{state}[/{style}]" if style else state]
        if with_weights:
            tone = _WEIGHTS_STYLE.get(row.weights, "")
            cells.append(f"[{tone}]{row.weights}[/{tone}]" if tone else row.weights)
        table.add_row(*cells)
    return table


def name_list(names: list[str], limit: int = 12) -> str:
    """A list of layer names for one line: the first `limit`, then how many more (--json has them all)."""
    if not names:
        return "-"
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more (--json lists all)" if len(names) > limit else "")


def net_summary(report) -> list[str]:
    lines = [f"heads: {', '.join(report.heads) or 'none found'}" + (f" ({report.head_note})" if report.head_note
                                                                    else ""),
             f"parameters: {report.total_params:,} total, {report.trainable_params:,} trainable"
             + (f" (shapes unknown for {', '.join(report.unknown_params)})" if report.unknown_params else "")]
    lines += [f"note: {note}" for note in report.notes]
    if report.weights is not None:
        w = report.weights
        lines.append(f"weights {w['path']}:")
        lines.append(f"  copied ({len(w['copied'])}): {name_list(w['copied'])}")
        lines.append(f"  from scratch ({len(w['scratch'])}): {name_list(w['scratch'])}")
        if w["partial"]:
            lines.append(f"  partly copied ({len(w['partial'])}): {name_list(w['partial'])}")
        lines.append(f"  unused in the file ({len(w['unused'])}): {name_list(w['unused'])}")
        for name, detail in w["mismatched"].items():
            lines.append(f"  MISMATCH {name}: {detail} -- caffe train -weights would abort; rename the layer "
                         f"or run `caffetune graft`")
    return lines


def weights_table(report):
    from rich.table import Table

    from caffetune.report.inspection import format_count, shape_text, size_text

    table = Table(title=f"{Path(report.path).name}: net {report.net_name or '(unnamed)'}, {report.format} format, "
                        f"{size_text(report.file_size)}", title_justify="left")
    for column in ("#", "layer", "type", "blobs", "count"):
        table.add_column(column, justify="right" if column in ("#", "count") else "left", overflow="fold")
    for index, row in enumerate(report.layers):
        blobs = ", ".join(shape_text(s) + ("" if d in ("float32", "") else f" {d}")
                          for s, d in zip(row["shapes"], row["dtypes"]))
        table.add_row(str(index), row["name"], row["type"], blobs, format_count(row["count"]) if blobs else "")
    return table


def weights_summary(report) -> list[str]:
    with_blobs = sum(1 for r in report.layers if r["shapes"])
    lines = [f"{len(report.layers)} layers, {with_blobs} with blobs, {report.total_params:,} parameters"]
    return lines + [f"problem: {p}" for p in report.problems]


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
        from caffetune.train.events import Notice
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
