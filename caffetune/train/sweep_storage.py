"""The study of a sweep: its storage (SQLite by default, PostgreSQL or MySQL to share it between machines), created
or joined, and the count of its finished trials that every worker stops at.

Several processes may open the same storage at once: table creation races are retried; a trial's process that
dies stops sending heartbeats, and the next process to look marks the trial failed and queues its values again
(optuna's RetryFailedTrialCallback).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.engine
import sqlalchemy.exc
from optuna.trial import TrialState

from caffetune.errors import SweepError

STUDY_FILE = "study.db"
CONFIG_ATTR = "caffetune_sweep"      # study user attribute: what the sweep searches and optimises
ERROR_ATTR = "error"                 # trial user attribute of a trial that failed on its own (counts as finished)


def storage_url(options, base: Path) -> str:
    if options.storage:
        return options.storage
    return f"sqlite:///{(base / options.runs_root / options.name / STUDY_FILE).resolve()}"


def open_storage(url: str, heartbeat: int | None = None, grace: int | None = None,
                 retries: int = 5) -> optuna.storages.RDBStorage:
    """The study's RDB storage; a heartbeat when given. Processes starting together may race on creating the
    tables, hence the retries; a server that cannot be reached is one clear error."""
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(retries):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback = optuna.storages.RetryFailedTrialCallback(max_retry=3) if heartbeat else None
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                                  grace_period=grace, failed_trial_callback=callback)
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as error:
            if attempt == retries - 1 or "could not connect" in str(error) or "unable to open" in str(error):
                raise SweepError(f"cannot open the study storage: {str(error.orig).strip()}", where=safe_url(url),
                                 fix="check the --storage URL, that the server runs and the database exists") \
                    from None
            time.sleep(0.5 + attempt)
        except (sqlalchemy.exc.ArgumentError, ModuleNotFoundError, ValueError) as error:
            raise SweepError(f"--storage {safe_url(url)}: {error}", where=safe_url(url),
                             fix="sqlite:///PATH, postgresql://USER@HOST/DB or mysql://...") from None
    raise AssertionError("unreachable")


def safe_url(url: str) -> str:
    """A storage URL without its password, for messages."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def open_study(options, storage: optuna.storages.BaseStorage, direction: str) -> optuna.Study:
    """Create the study, or join it; a study that searches something else under the same name is refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=options.seed, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=options.prune_startup,
                                         n_warmup_steps=options.prune_warmup) if options.prune \
        else optuna.pruners.NopPruner()
    study = optuna.create_study(storage=storage, study_name=options.name, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    config = {"space": options.space.specs(), "metric": options.metric, "direction": direction,
              "solver": str(options.solver)}
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        study.set_user_attr(CONFIG_ATTR, config)
    elif (stored["space"], stored["metric"], stored["direction"]) != (config["space"], config["metric"], direction):
        raise SweepError(f"the study {options.name} searches {', '.join(stored['space'])} for the "
                         f"{stored['direction']} {stored['metric']}; this command asks for "
                         f"{', '.join(config['space'])} ({direction} {options.metric})", where=safe_url(storage_url(
                             options, Path.cwd())) if options.storage else options.name,
                         fix="give the same --param/--metric as the study, or another --name")
    for values in options.enqueue:
        study.enqueue_trial(values, skip_if_exists=True)
    return study


def counts(study: optuna.Study, trials: list | None = None) -> tuple[int, int]:
    """(finished, running) trials: finished is complete, pruned, or failed with its own error (a trial whose
    process died is failed too, but queued again, so it does not count; so is one not run because the total was
    reached). `trials`: the study's trials when the caller has them already."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    finished = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   or (t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs))
    return finished, sum(1 for t in trials if t.state == TrialState.RUNNING)
