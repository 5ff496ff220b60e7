"""The results of a sweep, from its study: the table (`caffetune sweep --show NAME [--json]`), and the files in
runs/<name>/: sweep.csv, best.json + best.caffemodel (the best trial's), history.png and importance.png.

    study = sweep_results.load("flowers-lr", storage=None, runs_root=Path("runs"))
    sweep_results.as_json(study)   # {"trials": [{"number", "state", "params", "value", "run", ...}], "best": {...}}
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.figure  # noqa: E402
import matplotlib.ticker  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from caffetune import files  # noqa: E402
from caffetune.errors import SweepError  # noqa: E402
from caffetune.train import run_dir, sweep_storage  # noqa: E402
from caffetune.train.sweep_storage import CONFIG_ATTR  # noqa: E402

CSV_FILE, BEST_JSON, BEST_WEIGHTS = "sweep.csv", "best.json", "best.caffemodel"
# In a trial's run, with a --metric other than the main accuracy: the snapshot best by that metric (the run's own
# best.caffemodel is ranked by accuracy).
METRIC_WEIGHTS, METRIC_JSON = "best-metric.caffemodel", "best-metric.json"
HISTORY_PNG, IMPORTANCE_PNG = "history.png", "importance.png"


def load(name: str, storage: str | None, runs_root: Path = Path("runs"), base: Path | None = None) -> optuna.Study:
    """The study of a sweep (default storage: runs_root/name/study.db); a clear error when there is none."""
    base = (base or Path.cwd()).resolve()
    if storage is None:
        path = base / runs_root / name / sweep_storage.STUDY_FILE
        if not path.is_file():
            raise SweepError(f"no sweep {name}: {path} does not exist", where=str(path),
                             fix="pass the --name of a sweep run from this folder (or --runs-dir / --storage)")
        storage = f"sqlite:///{path}"
    try:
        return optuna.load_study(study_name=name, storage=sweep_storage.open_storage(storage))
    except KeyError:
        raise SweepError(f"the storage holds no study named {name}", where=sweep_storage.safe_url(storage),
                         fix="use the --name the sweep was started with") from None


def config(study: optuna.Study) -> dict:
    return study.user_attrs.get(CONFIG_ATTR, {})


def _seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start and trial.datetime_complete:
        return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)
    return None


def trial_row(trial: FrozenTrial) -> dict:
    return {"number": trial.number, "state": trial.state.name, "params": dict(trial.params), "value": trial.value,
            "iterations": trial.user_attrs.get("iterations"), "seconds": _seconds(trial),
            "run": trial.user_attrs.get("run"), "host": trial.user_attrs.get("host"),
            "note": trial.user_attrs.get("note") or trial.user_attrs.get("error") or ""}


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(completed, key=lambda t: (t.value, -t.number) if pick is max else (t.value, t.number))


def as_json(study: optuna.Study) -> dict:
    best = best_trial(study)
    cfg = config(study)
    return {"study": study.study_name, "metric": cfg.get("metric"), "direction": study.direction.name.lower(),
            "space": cfg.get("space", []), "trials": [trial_row(t) for t in study.get_trials(deepcopy=False)],
            "best": trial_row(best) if best else None}


def csv_text(study: optuna.Study) -> str:
    trials = study.get_trials(deepcopy=False)
    names = list(dict.fromkeys([spec.split("=", 1)[0] for spec in config(study).get("space", [])]
                               + [name for t in trials for name in t.params]))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "state", *names, "value", "iterations", "seconds", "run", "note"])
    for trial in trials:
        row = trial_row(trial)
        writer.writerow([row["number"], row["state"], *[trial.params.get(n, "") for n in names],
                         "" if row["value"] is None else row["value"], row["iterations"] or "",
                         "" if row["seconds"] is None else row["seconds"], row["run"] or "", row["note"]])
    return out.getvalue()


def _copy_best_weights(root: Path, best: FrozenTrial, previous: dict | None) -> str | None:
    """runs/<name>/best.caffemodel from the best trial's run (when its run directory is on this machine)."""
    run = Path(best.user_attrs.get("run", ""))
    source = run / METRIC_WEIGHTS if (run / METRIC_WEIGHTS).is_file() else run / BEST_WEIGHTS
    target = root / BEST_WEIGHTS
    if not source.is_file():
        return None
    if previous and previous.get("number") == best.number and target.is_file():
        return str(target)
    run_dir.copy_atomic(source, target)
    return str(target)


def write_outputs(study: optuna.Study, root: Path, plots: bool = True) -> dict | None:
    """sweep.csv, best.json + best.caffemodel, and (plots=True) the two PNGs. Returns best.json's content."""
    root = Path(root)
    files.write_atomic(root / CSV_FILE, csv_text(study))
    best = best_trial(study)
    info = None
    if best is not None:
        path = root / BEST_JSON
        previous = json.loads(path.read_text()) if path.is_file() else None
        info = trial_row(best) | {"metric": config(study).get("metric"), "direction": study.direction.name.lower()}
        run = Path(info["run"] or "")
        run_best = run / METRIC_JSON if (run / METRIC_JSON).is_file() else run / BEST_JSON
        if run_best.is_file():   # the snapshot kept: best by the sweep's metric, else by validation accuracy
            info["snapshot"] = json.loads(run_best.read_text())
        info["weights"] = _copy_best_weights(root, best, previous)
        files.write_atomic(path, json.dumps(info, indent=2, sort_keys=True) + "\n")
    if plots:
        write_plots(study, root)
    return info


# --- plots --------------------------------------------------------------------------------------------------------
def history_figure(study: optuna.Study) -> matplotlib.figure.Figure:
    """Each finished trial's value (complete ones filled, pruned ones hollow) and the best so far."""
    figure = matplotlib.figure.Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.intermediate_values]
    axes.scatter([t.number for t in complete], [t.value for t in complete], color="tab:blue", label="complete")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        axes.scatter([t.number for t in pruned], last, facecolors="none", edgecolors="tab:gray",
                     label="pruned (last test)")
    best, xs, ys = None, [], []
    for trial in sorted(complete, key=lambda t: t.number):
        if best is None or (trial.value > best if maximize else trial.value < best):
            best = trial.value
        xs.append(trial.number)
        ys.append(best)
    if xs:
        axes.step(xs, ys, where="post", color="tab:red", label="best so far")
    metric = config(study).get("metric", "value")
    axes.set(xlabel="trial", ylabel=metric, title=f"{study.study_name}: {metric} ({study.direction.name.lower()})")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if complete or pruned:
        axes.legend(loc="best")
    figure.tight_layout()
    return figure


def importances(study: optuna.Study) -> dict[str, float] | None:
    """Parameter importances (PED-ANOVA: no scikit-learn needed); None below two completed trials of different
    values."""
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(completed) < 2 or len({t.value for t in completed}) < 2:
        return None       # nothing tells the parameters apart
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # PED-ANOVA warns when every trial is a top trial
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            return optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError, ZeroDivisionError):
        return None
    finally:
        optuna.logging.set_verbosity(verbosity)


def importance_figure(study: optuna.Study) -> matplotlib.figure.Figure:
    figure = matplotlib.figure.Figure(figsize=(7, 3.5), dpi=100)
    axes = figure.add_subplot()
    found = importances(study)
    if not found:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        axes.text(0.5, 0.5, f"parameter importances need at least 2 completed trials with different values "
                            f"({done} so far)", ha="center", va="center", wrap=True)
        axes.set_axis_off()
    else:
        names = list(found)[::-1]
        axes.barh(names, [found[n] for n in names], color="tab:blue")
        axes.set(xlabel="importance (PED-ANOVA)", title=f"{study.study_name}: parameter importances")
    figure.tight_layout()
    return figure


def write_plots(study: optuna.Study, root: Path) -> list[Path]:
    written = []
    for name, make in ((HISTORY_PNG, history_figure), (IMPORTANCE_PNG, importance_figure)):
        with files.atomic_output(Path(root) / name) as handle:
            make(study).savefig(handle, format="png")
        written.append(Path(root) / name)
    return written


def table(study: optuna.Study) -> tuple[list[str], list[list[str]]]:
    """The --show table: header and rows of text."""
    metric = config(study).get("metric", "value")
    header = ["trial", "state", "params", f"best {metric}", "iterations", "time", "run directory"]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        row = trial_row(trial)
        params = " ".join(f"{k}={format(v, '.4g') if isinstance(v, float) else v}" for k, v in row["params"].items())
        state = row["state"].lower() + (f" ({row['note']})" if row["note"] else "")
        rows.append([str(row["number"]), state, params, "" if row["value"] is None else f"{row['value']:.4g}",
                     "" if row["iterations"] is None else str(row["iterations"]),
                     "" if row["seconds"] is None else f"{row['seconds']:.0f}s", row["run"] or ""])
    return header, rows
