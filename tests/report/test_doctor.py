"""`caffetune doctor`: which Caffe binary, pycaffe and schema caffetune uses, and the fix when one is missing."""
from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.cli.exit_codes import ExitCode


def test_doctor_json_names_binary_pycaffe_and_schema(caffe_install):
    result = subprocess.run([sys.executable, "-m", "caffetune", "doctor", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["caffe"] == str(caffe_install.binary)
    assert report["pycaffe"].endswith("__init__.py")
    assert "caffe.proto" in report["schema"]
    assert report["build"] in ("CPU_ONLY", "CUDA")


def test_doctor_fails_with_the_fix_when_caffe_is_missing(tmp_path):
    result = CliRunner().invoke(cli, ["--caffe", str(tmp_path / "nope"), "doctor"])
    assert result.exit_code == ExitCode.CAFFE_NOT_FOUND
    assert "not an executable caffe binary" in result.output
