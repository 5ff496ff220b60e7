"""Preflight basics: sources, labels, weight shapes, mean, crop, channels, top_k, snapshot; every problem at once,
before caffe starts. (The families of docs/preflight.md have their own files beside this one.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.errors import PreflightError
from caffetune.model import prototxt, schema
from caffetune.train import preflight

from helpers import save_random_weights, write_tiny_classifier, write_tiny_lmdb

PRETRAINED = """name: "pretrained"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {channels} dim: 8 dim: 8 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "{fc}" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param {{ num_output: {classes} bias_term: {bias} weight_filler {{ type: "xavier" }} }} }}
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    net, solver = write_tiny_classifier(folder)
    return folder, net, solver


def _weights(install, folder: Path, name: str, channels=3, classes=4, bias="true", fc="fc") -> Path:
    net = folder / f"{name}.prototxt"
    net.write_text(PRETRAINED.format(channels=channels, classes=classes, bias=bias, fc=fc))
    return save_random_weights(install, net, folder / f"{name}.caffemodel")


def _net(net_path: Path, replace: tuple[str, str] | None = None):
    text = net_path.read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    return prototxt.parse(text)


def _check(net, install=None, **kwargs) -> preflight.Report:
    return preflight.check({"train_val.prototxt": net}, install=install, **kwargs)


def _only(report: preflight.Report) -> str:
    assert len(report.problems) == 1, [str(p) for p in report.problems]
    return str(report.problems[0])


def test_a_clean_net_passes_and_reports_what_is_copied(tiny, caffe_install, tmp_path):
    _, net, _ = tiny
    weights = _weights(caffe_install, tmp_path, "renamed_head", fc="fc_old")
    report = _check(_net(net), caffe_install, weights=[weights])
    assert report.problems == []
    assert report.copied == ["conv1"] and report.scratch == ["fc"]
    assert report.info == ["copied from renamed_head.caffemodel: conv1", "from scratch (fillers): fc"]
    assert report.param_shapes["train_val.prototxt:TRAIN"]["fc"] == [[4, 144], [4]]


def test_net_that_does_not_build(tiny, caffe_install):
    _, net, _ = tiny
    broken = _net(net, ('bottom: "conv1" top: "fc"', 'bottom: "conv9" top: "fc"'))
    message = _only(_check(broken, caffe_install))
    assert "caffe cannot build the TRAIN and TEST net: " in message and "Unknown bottom blob 'conv9'" in message


def test_missing_data_source(tiny):
    _, net, _ = tiny
    broken = _net(net, ("train_lmdb", "no_such_lmdb"))
    assert "no_such_lmdb does not exist" in _only(_check(broken))


def test_lmdb_read_with_the_default_leveldb_backend(tiny):
    _, net, _ = tiny
    broken = _net(net, ('train_lmdb" backend: LMDB', 'train_lmdb"'))
    message = _only(_check(broken))
    assert "is a LMDB database but backend is LEVELDB (the default when backend is not set)" in message
    assert "add `backend: LMDB`" in message


def test_database_file_instead_of_its_folder(tiny):
    folder, net, _ = tiny
    broken = _net(net, ("train_lmdb", "train_lmdb/data.mdb"))
    message = _only(_check(broken))
    assert "is a file inside the database, not the database" in message
    assert f'set source: "{folder / "train_lmdb"}"' in message


def test_labels_outside_the_class_count(tiny, tmp_path):
    _, net, _ = tiny
    six = write_tiny_lmdb(tmp_path / "six_classes", count=12, classes=6)
    broken = _net(net, (str(tiny[0] / "train_lmdb"), str(six)))
    message = _only(_check(broken))
    assert "labels 4, 5" in message and "outside 0..3" in message and "head fc has num_output 4" in message
    assert "caffetune rewrite --classes 6" in message


def test_weights_layer_with_another_shape(tiny, caffe_install, tmp_path):
    _, net, _ = tiny
    weights = _weights(caffe_install, tmp_path, "ten_classes", classes=10)
    message = _only(_check(_net(net), caffe_install, weights=[weights]))
    assert "layer fc blob 0 has shape (10, 144) in the weights but (4, 144) in the net" in message
    assert "rename it" in message and "caffetune rewrite" in message


def test_weights_layer_with_another_blob_count(tiny, caffe_install, tmp_path):
    _, net, _ = tiny
    weights = _weights(caffe_install, tmp_path, "no_bias", bias="false")
    message = _only(_check(_net(net), caffe_install, weights=[weights]))
    assert "layer fc has 1 blob(s) in the weights but 2 in the net (bias_term differs)" in message
    assert "rename it" in message


def test_mean_file_of_another_size(tiny, tmp_path):
    _, net, _ = tiny
    blob = schema.current().BlobProto()
    blob.shape.dim.extend([1, 3, 10, 10])
    blob.data.extend(np.zeros(300, np.float32).tolist())
    mean_file = tmp_path / "mean.binaryproto"
    mean_file.write_bytes(blob.SerializeToString())
    broken = _net(net, ("transform_param { scale: 0.00390625 } }",
                        f'transform_param {{ scale: 0.00390625 mean_file: "{mean_file}" }} }}'))
    report = _check(broken)
    assert len(report.problems) == 2  # the TRAIN and the TEST data layer
    assert "is 3x10x10 (CxHxW) but the stored images are 3x8x8 (CxHxW)" in str(report.problems[0])


def test_crop_larger_than_the_images(tiny):
    _, net, _ = tiny
    test_layer = '\nlayer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }'
    broken = _net(net, ("transform_param { scale: 0.00390625 } }" + test_layer,
                        "transform_param { scale: 0.00390625 crop_size: 12 } }" + test_layer))
    message = _only(_check(broken))
    assert "crop_size 12 is larger than the stored images (8x8)" in message and "record 00000000" in message
    assert "use crop_size <= 8, or rebuild the database with larger images (`caffetune build-lmdb --resize 12x12` " \
           "or larger)" in message


def test_gray_data_into_a_color_conv1(tiny, caffe_install, tmp_path):
    folder, net, _ = tiny
    gray = write_tiny_lmdb(tmp_path / "gray", count=8, channels=1)
    weights = _weights(caffe_install, tmp_path, "color")
    broken = _net(net, (str(folder / "train_lmdb"), str(gray)))
    report = _check(broken, caffe_install, weights=[weights])
    assert "the data is gray (1 channel(s)) but conv1's pretrained weights expect 3 channels" in str(report.problems)
    assert "without --gray" in str(report.problems)


def test_accuracy_top_k_above_the_class_count(tiny):
    _, net, _ = tiny
    broken = _net(net, ('top: "accuracy" include', 'top: "accuracy" accuracy_param { top_k: 5 } include'))
    assert "Accuracy layer accuracy has top_k 5 but fc scores only 4 classes" in _only(_check(broken))


def test_snapshot_and_weights_together(tiny, caffe_install, tmp_path):
    _, net, _ = tiny
    weights = _weights(caffe_install, tmp_path, "w")
    state = tmp_path / "x.solverstate"
    state.write_bytes(b"")
    report = _check(_net(net), weights=[weights], snapshot=state)
    assert "both a snapshot and weights are given" in _only(report)
    assert "does not exist" in _only(_check(_net(net), snapshot=tmp_path / "missing.solverstate"))


def test_every_problem_is_reported_at_once_and_caffe_never_starts(caffe_install, tiny, tmp_path):
    _, net, solver = tiny
    text = net.read_text().replace("train_lmdb", "missing_lmdb").replace('test_lmdb" backend: LMDB', 'test_lmdb"')
    text = text.replace('top: "accuracy" include', 'top: "accuracy" accuracy_param { top_k: 9 } include')
    bad_net = tmp_path / "bad.prototxt"
    bad_net.write_text(text)
    bad_solver = tmp_path / "solver.prototxt"
    bad_solver.write_text(solver.read_text().replace(str(net), str(bad_net)))
    result = CliRunner().invoke(cli, ["run", "--solver", str(bad_solver), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1
    error = result.exception
    assert isinstance(error, PreflightError) and len(error.problems) == 3
    text = str(error)
    assert "missing_lmdb does not exist" in text and "backend is LEVELDB" in text and "top_k 9" in text
    assert not (tmp_path / "runs").exists()


def test_image_data_list_whose_images_are_not_under_root_folder(tmp_path):
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "cat" / "1.jpg").write_bytes(b"x")
    listing = tmp_path / "train.txt"
    listing.write_text("cat/1.jpg 0\ncat/2.jpg 0\n")
    net = prototxt.parse(f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" image_data_param {{ '
                         f'source: "{listing}" root_folder: "{tmp_path}/photos/" batch_size: 2 }} }}')
    message = _only(_check(net))
    assert "1 of the 2 images listed in" in message and f"{listing}:2: {tmp_path}/photos/cat/2.jpg" in message
    net.layer[0].image_data_param.source = str(tmp_path / "nope.txt")
    assert "image list" in _only(_check(net)) and "does not exist" in _only(_check(net))


def _no_test_iter(folder: Path) -> Path:
    """The tiny setup with a TEST phase but no test_iter: a warning (caffe would never test)."""
    _net_file, solver = write_tiny_classifier(folder, max_iter=2)
    solver.write_text(solver.read_text().replace("test_iter: 2\ntest_interval: 10\n", ""))
    return solver


def test_warnings_are_shown_and_the_run_starts(caffe_install, tmp_path):
    solver = _no_test_iter(tmp_path / "data")
    result = CliRunner().invoke(cli, ["run", "--solver", str(solver), "--runs-dir", str(tmp_path / "runs"),
                                      "--name", "warned"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "so caffe never tests" in result.output
    assert (tmp_path / "runs" / "warned" / "caffe.log").is_file()


def test_strict_turns_warnings_into_errors_and_no_preflight_skips_everything(caffe_install, tmp_path):
    solver = _no_test_iter(tmp_path / "data")
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["run", "--solver", str(solver), "--runs-dir", str(runs), "--strict"])
    assert result.exit_code == 1 and isinstance(result.exception, PreflightError)
    assert str(result.exception).startswith("0 error(s) and 1 warning(s) (--strict) found before launching caffe")
    assert result.exception.problems[0].level == "warning" and not runs.exists()
    result = CliRunner().invoke(cli, ["run", "--solver", str(solver), "--runs-dir", str(runs), "--strict",
                                      "--no-preflight", "--name", "unchecked"])
    assert result.exit_code == 0, result.output
    assert "never tests" not in result.output and (runs / "unchecked" / "caffe.log").is_file()
