"""Two `caffetune sweep` workers sharing one study on a real PostgreSQL server (Debian's package, installed by
`make setup`): a throwaway cluster in a temporary folder, on a unix socket only, stopped after the test."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

from caffetune.errors import SweepError
from caffetune.train import sweep, sweep_results, sweep_storage

from sweep_helpers import check_trial_runs, finish, trials, worker, write_learnable_classifier

pytestmark = pytest.mark.caffe
PORT = 5432   # only names the socket file inside the cluster's own folder: no TCP port is opened


def _as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user the Debian package creates."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@pytest.fixture
def postgres_url():
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not binaries:
        pytest.fail("PostgreSQL is required: `make setup` installs Debian's postgresql package")
    bindir = binaries[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="caffetune-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    data, log = folder / "data", folder / "server.log"
    user = _as_postgres_user()

    def tool(*args: str) -> None:
        subprocess.run(user + list(args), check=True, capture_output=True, timeout=120)

    try:
        tool(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "caffetune", "--no-sync")
        tool(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
             f"-c listen_addresses='' -k {folder} -p {PORT} -c fsync=off", "start")
        tool(str(bindir / "createdb"), "-h", str(folder), "-p", str(PORT), "-U", "caffetune", "sweeps")
        yield f"postgresql+psycopg2://caffetune@/sweeps?host={folder}&port={PORT}"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_study_on_postgresql(caffe_install, tmp_path, postgres_url):
    _, solver = write_learnable_classifier(tmp_path / "data", max_iter=30, test_interval=10)
    args = ["--solver", str(solver), "--name", "pg", "--trials", "4", "--param", "base_lr=log:1e-3:1e-1",
            "--storage", postgres_url, "--no-prune"]
    first, second = worker(tmp_path, *args, "--seed", "1"), worker(tmp_path, *args, "--seed", "2")
    outputs = [finish(first), finish(second)]
    assert not (tmp_path / "runs" / "pg" / "study.db").exists()          # the study lives on the server
    study = sweep_results.load("pg", postgres_url)
    complete = trials(study, optuna.trial.TrialState.COMPLETE)
    assert len(complete) == 4 and sweep_storage.counts(study) == (4, 0)
    # A trial that lost the race for the last place is a not-run FAIL, never run by a worker (as with SQLite).
    assert all(t.user_attrs.get("note") == sweep.NOT_RUN and "worker" not in t.user_attrs
               for t in trials(study) if t not in complete)
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    check_trial_runs(study)
    # The worker that stops last sees all 4 finished; the other may stop while the last trial still runs.
    assert any("4 of 4 trials finished in pg" in output for output in outputs), outputs
    assert all(re.search(r"[34] of 4 trials finished in pg(, 1 running in other workers)?", output)
               for output in outputs), outputs
    assert (tmp_path / "runs" / "pg" / "best.caffemodel").is_file()


def test_a_server_that_is_not_there_is_one_clear_error(tmp_path):
    url = f"postgresql+psycopg2://caffetune@/sweeps?host={tmp_path}&port={PORT}"
    with pytest.raises(SweepError, match="cannot open the study storage") as error:
        sweep_storage.open_storage(url, retries=1)
    assert "server" in error.value.fix
