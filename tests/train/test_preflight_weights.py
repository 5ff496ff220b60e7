"""Preflight on the pretrained weights: weights that were never trained, and a head that kept its pretrained name
and size while the data has fewer classes. The real Caffe shows that zero weights never learn."""
from __future__ import annotations

import pytest

from helpers import run_pycaffe, save_random_weights
from preflight_helpers import (
    assert_clean,
    check_text,
    edited,
    fatal_line,
    only,
    tiny_setup,
    train,
)

NO_FILLER = ' weight_filler { type: "xavier" }'


@pytest.fixture()
def setup(tmp_path):
    net, solver = tiny_setup(tmp_path / "tiny")
    return tmp_path, net, solver


def _weights(install, folder, text: str, name: str):
    (folder / f"{name}.prototxt").write_text(text)
    return save_random_weights(install, folder / f"{name}.prototxt", folder / f"{name}.caffemodel")


# --- 10. weights that are all zero or constant ---------------------------------------------------------------------
def test_weights_saved_without_fillers_are_an_error_and_caffe_never_learns_from_them(setup, caffe_install):
    folder, net, solver = setup
    zeros = _weights(caffe_install, folder, net.read_text().replace(NO_FILLER, ""), "no_fillers")
    message = only(check_text(net.read_text(), weights=[zeros]).problems)
    assert "the weights in no_fillers.caffemodel are not trained: every copied weight blob is constant " \
           "(conv1 (all 0), fc (all 0))" in message and "pass the trained .caffemodel" in message
    result = train(caffe_install, folder / "tiny", net.read_text(), solver.read_text() + "snapshot: 20\n",
                   f"-weights={zeros}")
    assert result.returncode == 0, fatal_line(result)
    largest = run_pycaffe(caffe_install, """
        import sys, caffe
        caffe.set_mode_cpu()
        net = caffe.Net(sys.argv[1], sys.argv[2], caffe.TEST)
        print(max(abs(net.params[name][0].data).max() for name in ("conv1", "fc")))
    """, str(net), str(folder / "tiny" / "snap_iter_20.caffemodel")).stdout.split()
    assert float(largest[-1]) == 0.0   # 20 iterations later: zero weights pass no gradient, they stay zero


def test_one_constant_layer_among_trained_ones_is_a_warning(setup, caffe_install):
    folder, net, _ = setup
    text = net.read_text()
    head, tail = text.split('name: "fc"', 1)
    partly = _weights(caffe_install, folder, head + 'name: "fc"' + tail.replace(NO_FILLER, "", 1), "partly")
    report = check_text(text, weights=[partly])
    assert report.problems == []
    assert "1 of the 2 copied layers have constant weights: fc (all 0)" in only(report.warnings)


def test_trained_looking_weights_are_clean(setup, caffe_install):
    folder, net, solver = setup
    weights = _weights(caffe_install, folder, net.read_text(), "random")
    report = check_text(net.read_text(), caffe_install, solver_text=solver.read_text(), weights=[weights])
    assert_clean(report)
    assert report.copied == ["conv1", "fc"]


# --- 13. a head that kept its pretrained name and size ---------------------------------------------------------------
def test_a_head_kept_with_more_classes_than_the_data_is_a_warning(setup, caffe_install):
    folder, net, solver = setup
    text = edited(net, ("num_output: 4 weight_filler", "num_output: 10 weight_filler"))
    weights = _weights(caffe_install, folder, text, "imagenet_like")
    report = check_text(text, caffe_install, solver_text=solver.read_text(), weights=[weights])
    assert report.problems == []
    message = only(report.warnings)
    assert "layer fc: head fc kept its pretrained name and size (10 classes), so its pretrained class weights " \
           "are copied, but the training data has 4 classes" in message
    assert "caffetune rewrite --classes 4 --name NEW" in message
    renamed = text.replace('name: "fc"', 'name: "fc_new"')
    assert_clean(check_text(renamed, caffe_install, solver_text=solver.read_text(), weights=[weights]))


# --- is anything fine-tuned? ----------------------------------------------------------------------------------------
def test_weights_that_match_no_layer_are_a_warning_and_caffe_ignores_them(setup, caffe_install):
    folder, net, solver = setup
    other = net.read_text().replace('name: "conv1"', 'name: "conv_a"').replace('name: "fc"', 'name: "fc_a"')
    weights = _weights(caffe_install, folder, other, "other_names")
    report = check_text(net.read_text(), caffe_install, solver_text=solver.read_text(), weights=[weights])
    assert report.problems == [] and report.copied == []
    message = only(report.warnings)
    assert "no layer of the net is copied from other_names.caffemodel: none of its 2 learnable layers (conv1, fc) " \
           "has a same-named layer there (it has: conv_a, fc_a)" in message and "the run trains from scratch" in message
    result = train(caffe_install, folder / "tiny", net.read_text(), solver.read_text(), f"-weights={weights}")
    assert result.returncode == 0, fatal_line(result)
    assert "Ignoring source layer conv_a" in result.stderr and "Ignoring source layer fc_a" in result.stderr


FROZEN_FC = ('top: "fc"\n', 'top: "fc" param { lr_mult: 0 } param { lr_mult: 0 }\n')


def test_a_new_head_frozen_is_an_error_and_caffe_never_changes_it(setup, caffe_install):
    folder, net, solver = setup
    text = edited(net, FROZEN_FC)
    weights = _weights(caffe_install, folder, net.read_text().replace('name: "fc"', 'name: "fc_old"'), "renamed")
    report = check_text(text, caffe_install, solver_text=solver.read_text(), weights=[weights])
    message = only(report.problems)
    assert "layer fc: head fc is frozen (param { lr_mult } 0) and is not in the weights, so it starts from its " \
           "filler" in message and "the classifier never learns" in message and "lr_mult } 10 and 20" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text() + "snapshot: 10\n", f"-weights={weights}")
    assert result.returncode == 0, fatal_line(result)
    values = run_pycaffe(caffe_install, """
        import sys, caffe
        caffe.set_mode_cpu()
        a, b = (caffe.Net(sys.argv[1], path, caffe.TEST) for path in sys.argv[2:])
        print(abs(a.params["fc"][0].data - b.params["fc"][0].data).max(),
              abs(a.params["conv1"][0].data - b.params["conv1"][0].data).max())
    """, str(net), *(str(folder / "tiny" / f"snap_iter_{i}.caffemodel") for i in (10, 20))).stdout.split()
    assert float(values[-2]) == 0.0 and float(values[-1]) > 0   # fc keeps its random filler; conv1 learns


def test_a_frozen_layer_from_fillers_below_the_head_is_a_warning(setup):
    _, net, _ = setup
    text = edited(net, ('top: "conv1"\n', 'top: "conv1" param { lr_mult: 0 } param { lr_mult: 0 }\n'))
    report = check_text(text)
    assert report.problems == []
    assert "layer conv1 is frozen (param { lr_mult } 0) and starts from its filler (no weights are given)" in \
        only(report.warnings)


def test_a_frozen_bilinear_upsampling_layer_is_clean(setup, caffe_install):
    _, net, solver = setup
    upsample = ('layer { name: "up" type: "Deconvolution" bottom: "conv1" top: "up" param { lr_mult: 0 } '
                'convolution_param { num_output: 4 group: 4 kernel_size: 4 stride: 2 bias_term: false '
                'weight_filler { type: "bilinear" } } }\n')
    text = edited(net, ('layer { name: "fc" type: "InnerProduct" bottom: "conv1"',
                        upsample + 'layer { name: "fc" type: "InnerProduct" bottom: "up"'))
    assert_clean(check_text(text, caffe_install, solver_text=solver.read_text()))


# --- weights files caffe cannot parse -------------------------------------------------------------------------------
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\noid sha256:"
               "4c8d1b4b2a3e9f0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a\nsize 243862418\n")


@pytest.mark.parametrize("content, expected, parsed", [
    (LFS_POINTER, f"is a Git LFS pointer ({len(LFS_POINTER)} bytes), not the weights", False),
    ("<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title>", "is an HTML page", True),
    ('name: "CaffeNet"\nlayer { name: "data" type: "Input" top: "data" }\n', "is a text file (a .prototxt?)", False),
])
def test_a_weights_file_that_is_not_weights_says_what_it_is(setup, caffe_install, content, expected, parsed):
    folder, net, solver = setup
    weights = folder / "model.caffemodel"
    weights.write_text(content)
    message = only(check_text(net.read_text(), weights=[weights]).problems)
    assert f"weights file {weights} {expected}" in message and "Failed to parse NetParameter file" in message
    result = train(caffe_install, folder / "tiny", net.read_text(), solver.read_text(), f"-weights={weights}")
    if parsed:   # worse than a crash: caffe reads an empty net, copies nothing and trains from scratch
        assert result.returncode == 0 and "Optimization Done" in result.stderr
    else:
        assert result.returncode != 0 and "Failed to parse NetParameter file" in fatal_line(result)


def test_a_truncated_weights_file_is_called_an_incomplete_download(setup, caffe_install):
    folder, net, _ = setup
    weights = _weights(caffe_install, folder, net.read_text(), "full")
    weights.write_bytes(weights.read_bytes()[:300])
    message = only(check_text(net.read_text(), weights=[weights]).problems)
    assert "the file ends early (an incomplete download or copy?)" in message
    assert "download or copy the .caffemodel again" in message
