"""The Caffe build `make setup` makes (found by caffe_tools), training a tiny net; glog line helpers."""
from __future__ import annotations

import os
import subprocess
import sys

from caffetune.model import caffe_tools

from helpers import caffe_train, write_tiny_classifier


def test_real_caffe_trains_a_tiny_net_on_a_tiny_lmdb(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path, max_iter=5)
    result = caffe_train(caffe_install, solver)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done." in result.stderr
    assert (tmp_path / "snap_iter_5.caffemodel").is_file()


def test_glog_prefixes_are_stripped_and_fatal_lines_recognised():
    line = "F1130 22:30:00.123456 12345 net.cpp:42] Check failed: shape mismatch"
    assert caffe_tools.strip_glog_prefix(line) == "Check failed: shape mismatch"
    assert caffe_tools.is_fatal_line(line)
    info = "I1130 22:30:00.1 7 solver.cpp:1] Iteration 10, loss = 2.3"
    assert caffe_tools.strip_glog_prefix(info) == "Iteration 10, loss = 2.3" and not caffe_tools.is_fatal_line(info)
    assert caffe_tools.strip_glog_prefix("plain text] here") == "plain text] here"


def test_the_venv_imports_the_built_pycaffe(caffe_install):
    # `make setup` puts a .pth file into the venv: users import pycaffe in their own scripts, no PYTHONPATH needed.
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "CAFFE_ROOT")}
    result = subprocess.run([sys.executable, "-c", "import caffe, os; print(os.path.realpath(caffe.__file__))"],
                            capture_output=True, text=True, env=env | {"GLOG_minloglevel": "2"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.realpath(caffe_install.pycaffe_dir / "caffe" / "__init__.py") == result.stdout.strip()
