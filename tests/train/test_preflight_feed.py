"""Preflight on what the nets are fed and minimise (a deploy net given to train, a net without a loss, labels of
one class or skipping classes, TRAIN/TEST preprocessing that differs, an R, G, B mean), and caffe's build failures
explained. Each fault is seeded into the good tiny setup; the real Caffe shows the failure the check prevents."""
from __future__ import annotations

import re

import pytest

from caffetune.model import schema

from helpers import write_tiny_lmdb
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

LOSS = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }'
TRAIN_DATA = 'layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }'
RELU = 'layer { name: "relu1"'


@pytest.fixture()
def setup(tmp_path):
    net, solver = tiny_setup(tmp_path / "tiny")
    return tmp_path, net, solver


def _replace_train_data(text: str, layer: str) -> str:
    start = text.index(TRAIN_DATA)
    end = text.index("layer {", start + 1)
    return text[:start] + layer + "\n" + text[end:]


def _losses(result) -> list[float]:
    return [float(value) for value in re.findall(r"Iteration \d+ \(.*\), loss = (\S+)", result.stderr)]


# --- a deploy net given to `caffe train` ------------------------------------------------------------------------------
def test_a_net_without_a_loss_is_an_error_and_caffe_trains_on_loss_zero(setup, caffe_install):
    folder, net, solver = setup
    text = edited(net, (LOSS, 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }'))
    message = only(check_text(text, caffe_install, solver_text=solver.read_text()).problems)
    assert "train_val.prototxt: the TRAIN net has no loss (its outputs: label, prob)" in message
    assert "SoftmaxWithLoss on the scores and the label" in message and "caffetune rewrite" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode == 0 and set(_losses(result)) == {0.0}


def test_an_input_layer_in_the_train_net_is_an_error_and_caffe_trains_on_it_anyway(setup, caffe_install):
    folder, net, solver = setup
    text = _replace_train_data(net.read_text(), 'layer { name: "data" type: "Input" top: "data" top: "label" '
                               'include { phase: TRAIN } input_param { shape { dim: 8 dim: 3 dim: 8 dim: 8 } '
                               'shape { dim: 8 } } }')
    message = only(check_text(text, caffe_install, solver_text=solver.read_text()).problems)
    assert "layer data (TRAIN): the net reads its data/label from an Input layer (data), which caffe train does " \
           "not feed" in message and "Data on an LMDB" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode == 0 and "Optimization Done" in result.stderr   # nothing stops it


def test_a_memory_data_layer_in_the_train_net_is_an_error_and_caffe_stops(setup, caffe_install):
    folder, net, solver = setup
    text = _replace_train_data(net.read_text(), 'layer { name: "data" type: "MemoryData" top: "data" top: "label" '
                               'include { phase: TRAIN } memory_data_param { batch_size: 8 channels: 3 height: 8 '
                               'width: 8 } }')
    assert "from a MemoryData layer (data), which caffe train does not feed" in \
        only(check_text(text, caffe_install, solver_text=solver.read_text()).problems)
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and "MemoryDataLayer needs to be initialized" in fatal_line(result)


def test_net_level_inputs_are_an_error(setup):
    _, net, solver = setup
    text = 'input: "extra"\ninput_shape { dim: 1 dim: 1 }\n' + net.read_text()
    assert "declares net-level inputs (extra), which caffe train does not feed" in \
        only(check_text(text, solver_text=solver.read_text()).problems)


# --- the labels -----------------------------------------------------------------------------------------------------
def test_training_labels_of_one_class_are_an_error_and_caffe_learns_to_answer_it(setup, caffe_install):
    folder, net, solver = setup
    write_tiny_lmdb(folder / "one_class", count=32, classes=1, seed=1)
    text = net.read_text().replace(str(folder / "tiny" / "train_lmdb"), str(folder / "one_class"))
    message = only(check_text(text, caffe_install, solver_text=solver.read_text()).problems)
    assert "every one of the 32 training records has label 0" in message and "one_class" in message
    # Seeded: from an unlucky random start 20 iterations may not be enough to reach the perfect loss.
    result = train(caffe_install, folder / "tiny", text, solver.read_text() + "random_seed: 7\n")
    assert result.returncode == 0
    assert _losses(result)[-1] < 0.1   # a perfect training loss ...
    accuracies = re.findall(r"Test net output #0: accuracy = (\S+)", result.stderr)
    assert float(accuracies[-1]) == 0.25   # ... and the validation accuracy of always answering 0 (4 classes)


def test_training_labels_numbered_from_one_are_a_warning(setup):
    folder, net, solver = setup
    write_tiny_lmdb(folder / "from_one", count=32, classes=5, seed=1)   # labels 0..4: drop the 0s, keep 1..4
    env_records = [(record, label) for record, label in _records(folder / "from_one") if label]
    write_records(folder / "shifted", env_records)
    text = edited(net, (str(folder / "tiny" / "train_lmdb"), str(folder / "shifted")),
                  ('num_output: 4 weight_filler { type: "xavier" } } }\nlayer { name: "accuracy"',
                   'num_output: 5 weight_filler { type: "xavier" } } }\nlayer { name: "accuracy"'))
    report = check_text(text, solver_text=solver.read_text())
    assert report.problems == []
    assert "the training labels skip 1 class: 0 (the labels start at 1); they run from 1 to 4 over 4 classes" in \
        only(report.warnings)


def _records(path):
    import lmdb
    import numpy as np

    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        for _key, value in txn.cursor():
            datum = schema.current().Datum()
            datum.ParseFromString(value)
            pixels = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
            yield pixels, datum.label
    env.close()


# --- preprocessing --------------------------------------------------------------------------------------------------
def test_a_test_layer_without_the_train_scale_is_a_warning(setup):
    folder, net, solver = setup
    test_source = f'source: "{folder / "tiny" / "test_lmdb"}" backend: LMDB batch_size: 8 }}'
    text = edited(net, (test_source + " transform_param { scale: 0.00390625 }", test_source))
    report = check_text(text, solver_text=solver.read_text())
    assert report.problems == []
    message = only(report.warnings)
    assert "layers data (TRAIN) and data (TEST): the TRAIN and TEST data layers of 'data' preprocess " \
           "differently: scale 0.00390625 in TRAIN, 1 (none) in TEST" in message and "same scale and mean" in message


def test_an_rgb_ordered_imagenet_mean_is_a_warning_and_the_bgr_one_is_clean(setup):
    _, net, solver = setup
    rgb = edited(net, ("transform_param { scale: 0.00390625 }", "transform_param { mean_value: 123.68 "
                       "mean_value: 116.78 mean_value: 103.94 }"))
    report = check_text(rgb, solver_text=solver.read_text())
    assert report.problems == []
    message = only(report.warnings)   # once for the layer name "data" (its TRAIN and TEST definitions)
    assert "mean_value 123.68 116.78 103.94 is the ImageNet mean in R, G, B order" in message
    assert "mean_value: 104 mean_value: 117 mean_value: 123" in message
    bgr = rgb.replace("mean_value: 123.68 mean_value: 116.78 mean_value: 103.94",
                      "mean_value: 104 mean_value: 117 mean_value: 123")
    assert_clean(check_text(bgr, solver_text=solver.read_text()))


# --- caffe's build failures, explained -----------------------------------------------------------------------------
@pytest.mark.parametrize("replacements, expected, fatal", [
    ([('type: "SoftmaxWithLoss"', 'type: "SigmoidCrossEntropyLoss"')],
     ["loss layer loss compares fc and label, of 32 and 8 values", "for a single 0/1 label use num_output 1"],
     "SIGMOID_CROSS_ENTROPY_LOSS layer inputs must have the same count"),
    ([(RELU, 'layer { name: "norm" type: "Normalize" bottom: "conv1" top: "conv1" }\n' + RELU)],
     ["layer norm has type Normalize, which this Caffe cannot build: it comes from SSD (weiliu89/caffe)",
      "--caffe PATH"], "Unknown layer type: Normalize"),
    ([("kernel_size: 3", "kernel_size: 11")],
     ["layer conv1 (Convolution) would output 8x4x-2x-2: its input (8x3x8x8) is smaller than its kernel",
      "smaller kernel_size"], "shape[i] >= 0"),
    ([(LOSS, LOSS.replace(' bottom: "label"', ""))],
     ["layer loss (SoftmaxWithLoss) has 1 bottom blob(s); it takes 2 (the label is missing"],
     "SoftmaxWithLoss Layer takes 2 bottom blob(s)"),
])
def test_build_failures_name_the_layer_and_the_fix(setup, caffe_install, replacements, expected, fatal):
    folder, net, solver = setup
    text = edited(net, *replacements)
    message = only(check_text(text, caffe_install, solver_text=solver.read_text()).problems)
    assert all(part in message for part in expected), message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and fatal in fatal_line(result)


# --- the validation set ---------------------------------------------------------------------------------------------
def test_testing_on_the_training_set_is_a_warning(setup):
    folder, net, solver = setup
    text = edited(net, (str(folder / "tiny" / "test_lmdb"), str(folder / "tiny" / "train_lmdb")))
    text = text.replace("test_iter: 2", "test_iter: 4")
    report = check_text(text, solver_text=solver.read_text().replace("test_iter: 2", "test_iter: 4"))
    assert report.problems == []
    message = only(report.warnings)
    assert "layer data (TEST): the TEST phase reads the training set" in message and "--val-fraction" in message


def test_a_validation_set_of_one_class_is_a_warning(setup):
    folder, net, solver = setup
    write_tiny_lmdb(folder / "val_one", count=16, classes=1, seed=2)
    text = edited(net, (str(folder / "tiny" / "test_lmdb"), str(folder / "val_one")))
    report = check_text(text, solver_text=solver.read_text())
    assert report.problems == []
    assert "every one of the 16 validation records has label 0" in only(report.warnings)


def test_a_label_every_loss_and_accuracy_ignores_is_accepted(setup, caffe_install):
    folder, net, solver = setup
    records = [(pixels, 255 if index % 8 == 7 else label) for index, (pixels, label)
               in enumerate(_records(folder / "tiny" / "train_lmdb"))]
    write_records(folder / "with_ignored", records)
    text = edited(net, (str(folder / "tiny" / "train_lmdb"), str(folder / "with_ignored")))
    message = only(check_text(text, solver_text=solver.read_text()).problems)
    assert "labels 255 in" in message and "outside 0..3" in message
    ignoring = text.replace('top: "loss" }', 'top: "loss" loss_param { ignore_label: 255 } }').replace(
        'top: "accuracy" include', 'top: "accuracy" accuracy_param { ignore_label: 255 } include')
    assert_clean(check_text(ignoring, caffe_install, solver_text=solver.read_text()))
    result = train(caffe_install, folder / "tiny", ignoring, solver.read_text())
    assert result.returncode == 0 and "Optimization Done" in result.stderr


def test_paired_databases_of_different_lengths_are_a_warning(setup):
    folder, net, solver = setup
    write_tiny_lmdb(folder / "labels_lmdb", count=30, seed=3)
    label_layer = ('layer { name: "labels" type: "Data" top: "pixel_label" top: "unused" include { phase: TRAIN }\n'
                   f'  data_param {{ source: "{folder / "labels_lmdb"}" backend: LMDB batch_size: 8 }} }}\n'
                   'layer { name: "silence" type: "Silence" bottom: "pixel_label" bottom: "unused" '
                   'include { phase: TRAIN } }\n')
    text = edited(net, ('layer { name: "conv1"', label_layer + 'layer { name: "conv1"'))
    report = check_text(text, solver_text=solver.read_text())
    assert report.problems == []
    assert "the TRAIN Data layers read databases of different lengths (data 32, labels 30 records)" in \
        only(report.warnings)
