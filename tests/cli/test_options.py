"""The CLI's shared machinery: global options after the subcommand, deprecated flag spellings, value types, exit
codes, and `python -m caffetune`."""
import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from caffetune.cli import cli, types
from caffetune.cli.app import DEPRECATED_FLAGS
from caffetune.cli.exit_codes import ExitCode

import helpers

NET = 'name: "t"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }\n'


def invoke(*args: str):
    return CliRunner(mix_stderr=False).invoke(cli, list(args))


@pytest.mark.parametrize("before", [True, False])
def test_caffe_is_accepted_before_and_after_the_subcommand(tmp_path, before):
    missing = str(tmp_path / "no-caffe")
    args = ["--caffe", missing, "doctor", "--json"] if before else ["doctor", "--json", "--caffe", missing]
    result = invoke(*args)
    assert result.exit_code == ExitCode.CAFFE_NOT_FOUND
    report = json.loads(result.stdout)
    assert report["caffe"] is None and missing in report["problems"][0]


@pytest.mark.parametrize("before", [True, False])
def test_proto_is_accepted_before_and_after_the_subcommand(tmp_path, before):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    missing = str(tmp_path / "fork.proto")
    common = ["inspect", str(net), "--no-pycaffe"]
    result = invoke(*(["--proto", missing, *common] if before else [*common, "--proto", missing]))
    assert result.exit_code == ExitCode.FAILED
    assert "caffe.proto not found" in str(result.exception) and missing in str(result.exception)


def test_every_command_takes_the_shared_options():
    for name, command in cli.commands.items():
        names = {opt for param in command.params for opt in param.opts}
        assert {"--proto", "--caffe"} <= names, name


def test_old_spellings_are_hidden_aliases_with_a_note(tmp_path):
    source = helpers.write_class_folders(tmp_path / "images", classes=2, per_class=2)
    out = tmp_path / "data"
    assert invoke("build-lmdb", str(source), "-o", str(out)).exit_code == 0
    refused = invoke("build-lmdb", str(source), "-o", str(out))
    assert refused.exit_code == ExitCode.FAILED and "--overwrite" in str(refused.exception)
    replaced = invoke("build-lmdb", str(source), "-o", str(out), "--force")
    assert replaced.exit_code == 0, replaced.stderr
    assert "--force is deprecated" in replaced.stderr and "use --overwrite" in replaced.stderr
    help_text = invoke("build-lmdb", "--help").stdout
    assert "--overwrite" in help_text and "--force" not in help_text


def test_aliases_map_to_options_the_command_has():
    assert DEPRECATED_FLAGS == {"--force": "--overwrite", "--fresh": "--overwrite", "--mean": "--mean-file",
                                "--mean-values": "--mean-value"}
    evaluate, rewrite = cli.commands["eval"], cli.commands["rewrite"]
    assert evaluate.aliases == {"--mean": "--mean-file", "--mean-values": "--mean-value"}
    assert evaluate._current_spellings(["--mean-values=1,2,3", "--mean", "m.binaryproto", "--", "--mean"]) == \
        ["--mean-value=1,2,3", "--mean-file", "m.binaryproto", "--", "--mean"]
    assert "--force" not in rewrite.aliases and set(cli.commands["demo"].aliases) == {"--force", "--fresh"}


def test_value_types_parse_once_and_fail_as_usage_errors():
    assert types.RENAME.convert("fc8=fc8_new", None, None) == ("fc8", "fc8_new")
    assert types.MEAN_VALUES.convert("104, 117 123", None, None) == (104.0, 117.0, 123.0)
    assert types.LR_MULTS.convert("10", None, None) == (10.0,)
    assert types.SIZE.convert("256x224", None, None) == (256, 224)
    assert types.SIZE.convert("32", None, None) == (32, 32)
    assert types.CLASS_PAIRS.convert("281:0, 285:1", None, None) == [(281, 0), (285, 1)]
    for kind, bad in ((types.RENAME, "fc8"), (types.MEAN_VALUES, "1,2"), (types.MEAN_VALUES, "a,b,c"),
                      (types.LR_MULTS, "1,2,3"), (types.SIZE, "0x3"), (types.SIZE, "big"),
                      (types.CLASS_PAIRS, "1:0,2:0"), (types.CLASS_PAIRS, "x:1")):
        with pytest.raises(click.BadParameter):
            kind.convert(bad, None, None)


def test_a_bad_value_is_a_usage_error_naming_the_option(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    result = invoke("rewrite", str(net), "--classes", "3", "--rename", "fc8", "--json")
    assert result.exit_code == ExitCode.USAGE
    assert "--rename" in result.stderr and "OLD=NEW" in result.stderr


def test_python_m_caffetune_prints_one_error_line_and_a_named_exit(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    result = subprocess.run([sys.executable, "-m", "caffetune", "plot", str(empty)], capture_output=True, text=True)
    assert result.returncode == ExitCode.FAILED
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "no iteration, loss or test lines" in result.stderr
