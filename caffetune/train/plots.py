"""Training curves: loss, accuracy and learning rate against iterations, one PNG (matplotlib, Agg backend)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: runs on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

from caffetune.errors import CaffetuneError  # noqa: E402
from caffetune.files import write_atomic  # noqa: E402
from caffetune.train.logparse import Record, is_accuracy, parse  # noqa: E402


def series(records: list[Record], phase: str, name: str, net: int = 0) -> tuple[list[int], list[float]]:
    """(iterations, values) of one value over the records of a phase; nan/inf are left out of the curve."""
    points = [(r.iteration, r.values[name]) for r in records
              if r.phase == phase and r.net == net and name in r.values and math.isfinite(r.values[name])]
    return [p[0] for p in points], [p[1] for p in points]


def _names(records: list[Record], phase: str, keep) -> list[tuple[int, str]]:
    seen: dict[tuple[int, str], None] = {}
    for record in records:
        if record.phase == phase:
            seen.update(dict.fromkeys((record.net, name) for name in record.values if keep(name)))
    return list(seen)


def _label(phase: str, net: int, name: str, nets: int) -> str:
    return f"{phase} {name}" if nets <= 1 else f"{phase}#{net} {name}"


def figure(records: list[Record], title: str = "") -> plt.Figure:
    """Three panels sharing the iteration axis: losses, accuracies, learning rate."""
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    test_nets = len({r.net for r in records if r.phase == "test"})
    panels = [(loss_ax, "loss", lambda n: "loss" in n.lower()), (acc_ax, "accuracy", is_accuracy)]
    for ax, ylabel, keep in panels:
        for phase in ("train", "test"):
            for net, name in _names(records, phase, keep):
                xs, ys = series(records, phase, name, net)
                if xs:
                    ax.plot(xs, ys, marker="." if phase == "test" else None,
                            label=_label(phase, net, name, test_nets if phase == "test" else 1))
        ax.set_ylabel(ylabel)
    xs, ys = series(records, "train", "lr")
    if xs:
        lr_ax.plot(xs, ys, label="lr", color="tab:green", drawstyle="steps-post")
        if min(ys) > 0 and max(ys) / min(ys) > 50:
            lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("iteration")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data in the log", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title)
    # Fixed margins: tight_layout would measure every label, which costs as much as drawing the figure.
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.06, top=0.95 if title else 0.98, hspace=0.08)
    return fig


def write_png(records: list[Record], path: Path | str, title: str = "") -> Path:
    """Draw the curves of `records` into a PNG (written atomically)."""
    fig = figure(records, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
    return Path(path)


def plot_log(log: Path | str, output: Path | str | None = None) -> tuple[Path, list[Record]]:
    """Curves of any caffe training log into a PNG (default: LOG.png): (the PNG, the records it drew)."""
    with open(log, errors="replace") as lines:
        records = parse(lines)
    if not records:
        raise CaffetuneError("no iteration, loss or test lines in this file", where=str(log),
                             fix="pass the log of `caffe train` (its stderr, or GLOG's caffe.INFO file)")
    return write_png(records, output or f"{log}.png", title=Path(log).name), records
