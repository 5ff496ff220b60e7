"""`caffetune inspect` (nets and weights files) and shape inference, checked against the real pycaffe."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.model import prototxt, schema, shapes
from caffetune.report import inspection as report_lib

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "inspect"

TINY = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool1" top: "fc1" inner_product_param { num_output: 16 } }
layer { name: "fc_new" type: "InnerProduct" bottom: "fc1" top: "fc_new"
  param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 }
  inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc_new" top: "prob" }
"""


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CAFFETUNE_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file (CAFFETUNE_UPDATE_GOLDEN=1 rewrites it)"


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture
def tiny_net(tmp_path) -> Path:
    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY)
    return path


def tiny_weights(path: Path, v1: bool = False) -> Path:
    """A deterministic caffemodel for the tiny net without its head (fc_new), plus an unused layer."""
    net = schema.current().NetParameter(name="tiny")
    blobs = {"conv1": [(8, 3, 3, 3), (8,)], "bn1": [(8,), (8,), (1,)], "relu1": [], "fc1": [(16, 128), (16,)],
             "fc8": [(1000, 16), (1000,)]}
    enum = net.DESCRIPTOR.fields_by_name["layers"].message_type.fields_by_name["type"].enum_type
    v1_types = {"conv1": "CONVOLUTION", "relu1": "RELU", "fc1": "INNER_PRODUCT", "fc8": "INNER_PRODUCT"}
    for name, shapes_ in blobs.items():
        if v1 and name == "bn1":
            continue
        layer = net.layers.add(name=name, type=enum.values_by_name[v1_types[name]].number) if v1 else \
            net.layer.add(name=name, type="Convolution" if name == "conv1" else "BatchNorm" if name == "bn1"
                          else "ReLU" if name == "relu1" else "InnerProduct")
        for shape in shapes_:
            blob = layer.blobs.add()
            if v1:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - len(shape)) + shape
            else:
                blob.shape.dim.extend(shape)
            blob.data.extend(np.full(int(np.prod(shape)), 0.5, np.float32).tolist())
    path.write_bytes(net.SerializeToString())
    return path


def test_net_table_golden(tiny_net):
    check_golden("tiny_net.txt", run_cli("inspect", str(tiny_net), "--no-pycaffe"))


def test_net_with_weights_golden(tiny_net, tmp_path):
    model = tiny_weights(tmp_path / "tiny.caffemodel")
    text = run_cli("inspect", str(tiny_net), "--weights", str(model), "--no-pycaffe")
    check_golden("tiny_net_weights.txt", text.replace(str(model), "tiny.caffemodel"))


@pytest.mark.parametrize("v1", [False, True], ids=["v2", "v1"])
def test_weights_file_golden(tmp_path, v1):
    model = tiny_weights(tmp_path / "tiny.caffemodel", v1=v1)
    check_golden(f"tiny_weights_{'v1' if v1 else 'v2'}.txt", run_cli("inspect", str(model)))


def test_json_report_of_net_and_weights(tiny_net, tmp_path):
    model = tiny_weights(tmp_path / "tiny.caffemodel")
    report = json.loads(run_cli("inspect", str(tiny_net), "--weights", str(model), "--json", "--no-pycaffe"))
    assert report["heads"] == ["fc_new"] and report["shape_source"] == "caffetune"
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["conv1"]["state"] == "frozen" and rows["fc1"]["state"] == "fine-tuned"
    assert rows["fc_new"]["state"] == "new" and rows["fc_new"]["head"]
    assert rows["fc1"]["params"] == [[16, 128], [16]] and rows["pool1"]["outputs"] == [[2, 8, 4, 4]]
    assert report["total_params"] == 8 * 27 + 8 + 17 + 16 * 128 + 16 + 3 * 16 + 3
    assert report["trainable_params"] == 16 * 128 + 16 + 3 * 16 + 3  # frozen conv and BatchNorm excluded
    assert report["weights"]["copied"] == ["conv1", "bn1", "fc1"]  # relu1 matches too, with nothing to copy
    assert report["weights"]["scratch"] == ["fc_new"] and report["weights"]["unused"] == ["fc8"]
    listing = json.loads(run_cli("inspect", str(model), "--json"))
    assert [layer["name"] for layer in listing["layers"]] == ["conv1", "bn1", "relu1", "fc1", "fc8"]
    assert listing["total_params"] == 8 * 27 + 8 + 17 + 16 * 128 + 16 + 1000 * 16 + 1000


def test_v1_weights_pair_with_a_v2_net_like_caffe(tiny_net, tmp_path):
    model = tiny_weights(tmp_path / "v1.caffemodel", v1=True)
    report = report_lib.inspect_net(tiny_net, model, use_pycaffe=False)
    assert report.weights["copied"] == ["conv1", "fc1"]  # legacy (1,1,1,8) biases match (8,)
    assert report.weights["scratch"] == ["bn1", "fc_new"] and report.weights["mismatched"] == {}


def test_pycaffe_shapes_are_used_when_available(caffe_install, tiny_net):
    with_caffe = report_lib.inspect_net(tiny_net, use_pycaffe=True)
    inferred = report_lib.inspect_net(tiny_net, use_pycaffe=False)
    assert with_caffe.shape_source == "pycaffe" and inferred.shape_source == "caffetune"
    for a, b in zip(with_caffe.layers, inferred.layers):
        assert (a.name, a.outputs, a.params) == (b.name, b.outputs, b.params)


@pytest.mark.parametrize("model", ["models/bvlc_reference_caffenet/deploy.prototxt",
                                   "models/bvlc_googlenet/deploy.prototxt", "examples/mnist/lenet.prototxt",
                                   "examples/cifar10/cifar10_full.prototxt"])
def test_shape_inference_agrees_with_caffe(caffe_install, caffe_source, model):
    path = caffe_source / model
    real = report_lib.pycaffe_shapes(path, "TEST", caffe_install)
    inferred = shapes.infer(prototxt.load(path), "TEST")
    assert inferred.problems == []
    for layer, tops in real.outputs.items():
        if layer in inferred.outputs:  # Caffe adds split layers of its own
            assert inferred.outputs[layer] == tops, layer
    assert {k: v for k, v in inferred.params.items() if v} == real.params


def test_missing_lmdb_falls_back_to_inference_with_caffes_reason(caffe_install, tmp_path):
    net = tmp_path / "train.prototxt"
    net.write_text(TINY.replace('type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 16 dim: 16 } }',
                                'type: "Data" top: "data" data_param { source: "no_lmdb" backend: LMDB batch_size: 2 }'))
    report = report_lib.inspect_net(net)
    assert report.shape_source == "caffetune"
    assert any("pycaffe could not build the net" in note and "mdb_status" in note for note in report.notes)
    assert {row.name: row.outputs for row in report.layers}["fc1"] == [(2, 16)]


def test_big_nets_are_not_built_in_pycaffe_for_their_shapes(caffe_install, caffe_source, monkeypatch):
    monkeypatch.setattr(report_lib, "PYCAFFE_MAX_BYTES", 100_000_000)   # CaffeNet's parameters alone are 244 MB
    report = report_lib.inspect_net(caffe_source / "models/bvlc_reference_caffenet/train_val.prototxt")
    assert report.shape_source == "caffetune"
    assert any("GB (parameters and prefetched batches)" in note for note in report.notes)
    rows = {row.name: row for row in report.layers}
    assert rows["data"].outputs[0] == (256, None, 227, 227)  # channels need the LMDB
    assert rows["fc6"].params == [(4096, 9216), (4096,)]
    assert report.heads == ["fc8"]


def test_a_non_caffemodel_given_as_weights_is_an_error(tiny_net, tmp_path):
    bogus = tmp_path / "bogus.caffemodel"
    bogus.write_text('name: "x"\n')
    result = CliRunner().invoke(cli, ["inspect", str(bogus)])
    assert result.exit_code != 0 and "not a caffemodel" in str(result.exception)


def test_weights_listing_reports_blobs_whose_data_does_not_fill_their_shape(tmp_path):
    model = tmp_path / "broken.caffemodel"
    net = schema.current().NetParameter(name="broken")
    blob = net.layer.add(name="fc", type="InnerProduct").blobs.add()
    blob.shape.dim.extend([20, 10])
    blob.data.extend([1.0] * 150)
    model.write_bytes(net.SerializeToString())
    report = report_lib.inspect_weights(model)
    assert report.layers[0]["shapes"] == [[20, 10]]
    assert report.problems == ["fc: blob 0 has shape [20, 10] (200 values) but stores 150 values; Caffe refuses it"]
