"""Preflight on the nets: Python layers, per-phase definitions, frozen nets, BatchNorm on batches of one. Each fault is
seeded into the good tiny setup; the real Caffe shows the failure the check prevents. Good setups stay clean."""
from __future__ import annotations

import re
import sysconfig

import cv2
import numpy as np
import pytest

from helpers import run_pycaffe, save_random_weights, write_tiny_lmdb
from preflight_helpers import (
    assert_clean,
    check_text,
    edited,
    fatal_line,
    only,
    tiny_setup,
    train,
    write_records,
)

IDENT_LAYER = """import caffe


class Ident(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
"""
PYTHON_LAYER = ('layer { name: "ident" type: "Python" bottom: "conv1" top: "ident" '
                'python_param { module: "ident_layer" layer: "Ident" } }\n')
FC = 'layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"'


@pytest.fixture()
def setup(tmp_path):
    net, solver = tiny_setup(tmp_path / "tiny")
    return tmp_path, net, solver


def _with_python_layer(net, module="ident_layer") -> str:
    return edited(net, (FC, PYTHON_LAYER.replace("ident_layer", module) + FC.replace('bottom: "conv1"',
                                                                                     'bottom: "ident"')))


# --- 5. Python layers -------------------------------------------------------------------------------------------
def test_a_python_layer_whose_module_is_not_found(setup, caffe_install, monkeypatch):
    folder, net, solver = setup
    (folder / "layers").mkdir()
    (folder / "layers" / "ident_layer.py").write_text(IDENT_LAYER)
    monkeypatch.setenv("PYTHONPATH", str(folder / "elsewhere"))
    text = _with_python_layer(net)
    message = only(check_text(text, caffe_install).problems)
    assert "layer ident (TEST/TRAIN): Python layer ident: module ident_layer is not found" in message
    assert "export PYTHONPATH=/that/folder:$PYTHONPATH" in message and "searched: " in message
    assert f"PYTHONPATH={folder / 'elsewhere'}, then pycaffe's folder" in message and "error_already_set" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and "No module named 'ident_layer'" in result.stderr
    assert "error_already_set" in result.stderr


def test_a_python_layer_class_that_the_module_lacks(setup, caffe_install, monkeypatch):
    folder, net, _ = setup
    (folder / "layers").mkdir()
    (folder / "layers" / "ident_layer.py").write_text(IDENT_LAYER.replace("class Ident", "class Identity"))
    monkeypatch.setenv("PYTHONPATH", f"{folder / 'layers'}:{sysconfig.get_paths()['purelib']}")
    message = only(check_text(_with_python_layer(net), caffe_install).problems)
    assert f"{folder / 'layers' / 'ident_layer.py'} defines no class Ident" in message


def test_a_python_layer_on_the_pythonpath_is_clean_and_trains(setup, caffe_install, monkeypatch):
    folder, net, solver = setup
    (folder / "layers").mkdir()
    (folder / "layers" / "ident_layer.py").write_text(IDENT_LAYER)
    # Only the layer's folder: caffe's embedded Python starts from its base site-packages, and CaffeInstall.env
    # adds this virtualenv's (the numpy pycaffe was built for) by itself.
    monkeypatch.setenv("PYTHONPATH", str(folder / "layers"))
    text = _with_python_layer(net)
    assert_clean(check_text(text, caffe_install, solver_text=solver.read_text()))
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode == 0, fatal_line(result)


# --- 6. one layer defined per phase with different blobs -----------------------------------------------------------
def _per_phase(net, header: str, train_edit: tuple[str, str], test_edit: tuple[str, str]) -> str:
    """The layer starting with `header` (two lines) defined twice: once per phase, each edited."""
    text = net.read_text()
    start = text.index(header)
    end = text.index("\n", text.index("\n", start) + 1) + 1
    definition = text[start:end]

    def phase(name: str, edit: tuple[str, str]) -> str:
        return definition.replace(header, f"{header} include {{ phase: {name} }}").replace(*edit)

    return text[:start] + phase("TRAIN", train_edit) + phase("TEST", test_edit) + text[end:]


def test_a_layer_defined_per_phase_with_another_blob_count(setup, caffe_install):
    folder, net, solver = setup
    text = _per_phase(net, FC, ("num_output: 4", "num_output: 4 bias_term: true"),
                      ("num_output: 4", "num_output: 4 bias_term: false"))
    message = only(check_text(text).problems)
    assert "layer fc differs between the phases: 2 blob(s): num_output 4, bias_term true in TRAIN, 1 blob(s): " \
           "num_output 4, bias_term false in TEST" in message
    assert "define the layer once, without `include { phase }`" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and "Incompatible number of blobs for layer fc" in fatal_line(result)


def test_a_layer_defined_per_phase_with_another_shape_is_found_by_building(setup, caffe_install):
    _, net, _ = setup
    conv = 'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"'
    text = _per_phase(net, conv, ("kernel_size: 3", "kernel_size: 3"), ("kernel_size: 3", "kernel_size: 5"))
    report = check_text(text, caffe_install)
    shown = [str(p) for p in report.problems]
    assert any("layer conv1 differs between the phases: blob shapes [[4, 3, 3, 3], [4]] in TRAIN, "
               "[[4, 3, 5, 5], [4]] in TEST" in p for p in shown), shown


# --- 9. everything frozen ------------------------------------------------------------------------------------------
FROZEN = "param { lr_mult: 0 } param { lr_mult: 0 } "


def _frozen(net) -> str:
    return edited(net, ('top: "conv1"\n  convolution_param', f'top: "conv1"\n  {FROZEN}convolution_param'),
                  ('top: "fc"\n  inner_product_param', f'top: "fc"\n  {FROZEN}inner_product_param'))


def test_a_net_frozen_everywhere_is_an_error_and_caffe_learns_nothing(setup, caffe_install):
    folder, net, solver = setup
    text = _frozen(net)
    message = only(check_text(text).problems)
    assert "every learnable layer of the TRAIN net is frozen (param { lr_mult } 0 on all 2 of them, the head(s) " \
           "fc too)" in message and "the run learns nothing" in message
    weights = save_random_weights(caffe_install, net, folder / "start.caffemodel")
    result = train(caffe_install, folder / "tiny", text, solver.read_text() + "snapshot: 20\n", f"-weights={weights}")
    assert result.returncode == 0, fatal_line(result)
    unchanged = run_pycaffe(caffe_install, """
        import sys, caffe, numpy
        caffe.set_mode_cpu()
        before, after = (caffe.Net(sys.argv[1], w, caffe.TEST) for w in sys.argv[2:])
        print(all(numpy.array_equal(b.data, a.data) for name in before.params
                  for b, a in zip(before.params[name], after.params[name])))
    """, str(net), str(weights), str(folder / "tiny" / "snap_iter_20.caffemodel")).stdout.split()
    assert unchanged == ["True"]


def test_a_v1_net_is_clean_and_frozen_v1_is_caught(setup, caffe_install):
    folder, _, solver = setup
    v1 = V1_NET.format(train=folder / "tiny" / "train_lmdb", test=folder / "tiny" / "test_lmdb")
    assert_clean(check_text(v1, caffe_install, solver_text=solver.read_text()))
    frozen = v1.replace("blobs_lr: 1 blobs_lr: 2", "blobs_lr: 0 blobs_lr: 0")
    assert "(blobs_lr 0 on all 2 of them" in only(check_text(frozen).problems)


V1_NET = """name: "tiny_v1"
layers {{ name: "data" type: DATA top: "data" top: "label" include {{ phase: TRAIN }}
  data_param {{ source: "{train}" backend: LMDB batch_size: 8 }} transform_param {{ scale: 0.00390625 }} }}
layers {{ name: "data" type: DATA top: "data" top: "label" include {{ phase: TEST }}
  data_param {{ source: "{test}" backend: LMDB batch_size: 8 }} transform_param {{ scale: 0.00390625 }} }}
layers {{ name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 1 blobs_lr: 2
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layers {{ name: "relu1" type: RELU bottom: "conv1" top: "conv1" }}
layers {{ name: "fc" type: INNER_PRODUCT bottom: "conv1" top: "fc" blobs_lr: 1 blobs_lr: 2
  inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
layers {{ name: "accuracy" type: ACCURACY bottom: "fc" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
layers {{ name: "loss" type: SOFTMAX_LOSS bottom: "fc" bottom: "label" top: "loss" }}
"""


# --- 11. BatchNorm on batches of one -------------------------------------------------------------------------------
BN_AFTER_FC = ('layer { name: "fc_bn" type: "BatchNorm" bottom: "fc" top: "fc" }\n'
               'layer { name: "accuracy"')
BN_AFTER_CONV = ('layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" PARAMS }\n'
                 'layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }'
                 '\nlayer { name: "relu1"')


def _batch(text: str, train: int, test: int) -> str:
    head, tail = text.split("include { phase: TEST }", 1)
    return head.replace("batch_size: 8", f"batch_size: {train}") + "include { phase: TEST }" + \
        tail.replace("batch_size: 8", f"batch_size: {test}", 1)


def test_batch_statistics_on_a_batch_of_one_after_an_inner_product_are_all_zero(setup, caffe_install):
    folder, net, _ = setup
    text = _batch(edited(net, ('layer { name: "accuracy"', BN_AFTER_FC)), 1, 8)
    message = only(check_text(text).problems)
    assert "layer fc_bn (TRAIN): 1 BatchNorm layer (fc_bn) computes batch statistics (use_global_stats false, or " \
           "unset, which means false in TRAIN) over a batch of 1 on a 1x1 input" in message
    assert "outputs all zeros" in message
    (folder / "bn.prototxt").write_text(text)
    output = run_pycaffe(caffe_install, """
        import sys, caffe
        caffe.set_mode_cpu()
        net = caffe.Net(sys.argv[1], caffe.TRAIN)
        net.forward()
        print(abs(net.blobs["fc"].data).max())
    """, str(folder / "bn.prototxt")).stdout.split()
    assert float(output[-1]) == 0.0


def test_batch_statistics_on_a_batch_of_one_feature_map_is_a_warning(setup):
    _, net, _ = setup
    text = _batch(edited(net, ('layer { name: "relu1"', BN_AFTER_CONV.replace("PARAMS", ""))), 1, 8)
    report = check_text(text)
    assert report.problems == [] and "1 BatchNorm layer (bn1) computes batch statistics" in only(report.warnings)


def test_trainable_batch_norm_with_a_test_batch_of_one_is_clean_and_trains(setup, caffe_install):
    folder, net, solver = setup
    text = _batch(edited(net, ('layer { name: "relu1"', BN_AFTER_CONV.replace("PARAMS", ""))), 8, 1)
    solver_text = solver.read_text().replace("test_iter: 2", "test_iter: 16")
    assert_clean(check_text(text, caffe_install, solver_text=solver_text))
    result = train(caffe_install, folder / "tiny", text, solver_text)
    assert result.returncode == 0, fatal_line(result)


def test_a_gray_encoded_lmdb_with_frozen_batch_norm_is_clean(setup, caffe_install):
    folder, net, solver = setup
    rng = np.random.default_rng(5)
    for name, count in (("gray_train", 32), ("gray_test", 16)):
        write_records(folder / name, [(cv2.imencode(".png", rng.integers(0, 256, (8, 8), dtype=np.uint8))[1]
                                       .tobytes(), i % 4) for i in range(count)])
    frozen_bn = BN_AFTER_CONV.replace("PARAMS", "param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 } "
                                               "batch_norm_param { use_global_stats: true }")
    text = edited(net, ('layer { name: "relu1"', frozen_bn), (str(folder / "tiny" / "train_lmdb"),
                                                                str(folder / "gray_train")),
                  (str(folder / "tiny" / "test_lmdb"), str(folder / "gray_test")))
    (folder / "gray.prototxt").write_text(text)
    weights = save_random_weights(caffe_install, folder / "gray.prototxt", folder / "gray.caffemodel")
    report = check_text(text, caffe_install, solver_text=solver.read_text(), weights=[weights])
    assert_clean(report)
    assert report.copied == ["conv1", "bn1", "scale1", "fc"]


def test_the_tiny_lmdb_helper_is_not_sorted(tmp_path):
    from caffetune.train import data_scan

    scan = data_scan.scan_lmdb(write_tiny_lmdb(tmp_path / "db", count=12))
    assert scan.runs == 12 and scan.sizes == {(3, 8, 8): ("00000000", 12)}


def test_batch_norm_with_stored_statistics_from_scratch_is_an_error_and_its_loss_explodes(setup, caffe_install):
    folder, net, solver = setup
    trainable = edited(net, ('layer { name: "relu1"', BN_AFTER_CONV.replace("PARAMS", "")))
    global_stats = BN_AFTER_CONV.replace("PARAMS", "batch_norm_param { use_global_stats: true }")
    text = edited(net, ('layer { name: "relu1"', global_stats))
    message = only(check_text(text, caffe_install, solver_text=solver.read_text()).problems)
    assert "1 BatchNorm layer(s) (bn1) use their stored statistics in TRAIN (use_global_stats: true) but start " \
           "from zero statistics (no weights)" in message and "1/sqrt(eps) = 316" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    first = float(re.search(r"Iteration 0 \(.*\), loss = (\S+)", result.stderr).group(1))
    assert result.returncode == 0 and first > 10   # chance level is ln(4) = 1.39
    assert_clean(check_text(trainable, caffe_install, solver_text=solver.read_text()))
