"""`caffetune sweep` on the command line: a bad --param, a missing option, an unknown sweep are one message and a
named exit status, never a traceback (no Caffe needed: all are refused before the first trial)."""
from __future__ import annotations

import subprocess
import sys

import pytest


def _sweep(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caffetune", "sweep", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, status, message", [
    (["--param", "learning_rate=log:1e-4:1e-1"], 1, "--param learning_rate: not a parameter caffetune sweeps"),
    (["--param", "base_lr=log:0:1"], 1, "log:LOW:HIGH needs LOW > 0"),
    (["--param", "base_lr=log:1e-4:1e-1", "--try", "base_lr=5"], 1, "--try base_lr=5: outside the space"),
    (["--param", "base_lr=log:1e-4:1e-1", "--name", "../x"], 1, "a sweep's name is one folder name"),
    ([], 2, "give --param"),
])
def test_bad_input_is_one_message_and_a_named_exit(tmp_path, args, status, message):
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "missing.prototxt"\nbase_lr: 0.01\nmax_iter: 10\n')
    base = ["--solver", str(solver), "--trials", "2"] + ([] if "--name" in args else ["--name", "s"])
    result = _sweep(*base, *args, cwd=tmp_path)
    assert result.returncode == status, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_show_of_a_sweep_that_does_not_exist(tmp_path):
    result = _sweep("--show", "nothing", cwd=tmp_path)
    assert result.returncode == 1 and "no sweep nothing" in result.stderr and "Traceback" not in result.stderr
