"""Reading V0 nets (2014) and mis-keyed `layers {}` blocks: the upgrade matches Caffe's own upgrade_net_proto_text."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from caffetune.errors import NetError, PrototxtError
from caffetune.model import layers, prototxt, upgrade

DATA = Path(__file__).resolve().parent.parent / "data" / "rewrite"

# One V0 net using every V0 field family: data transformation, padding layers, conv/pool/lrn/dropout/concat params,
# image and window data, blobs_lr/weight_decay, and a deploy-style input.
V0_EVERYTHING = """
name: "V0Everything"
input: "extra"
input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4
layers { layer { name: "images" type: "images" source: "list.txt" batchsize: 2 new_height: 10 new_width: 10
                 shuffle_images: true rand_skip: 3 meanfile: "mean.binaryproto" cropsize: 8 mirror: true
                 scale: 0.5 } top: "data" top: "label" }
layers { layer { name: "windows" type: "window_data" source: "windows.txt" batchsize: 2 det_fg_threshold: 0.5
                 det_bg_threshold: 0.4 det_fg_fraction: 0.25 det_context_pad: 16 det_crop_mode: "square" }
         top: "wdata" top: "wlabel" }
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 group: 1 biasterm: false
                 weight_filler { type: "gaussian" std: 0.01 } blobs_lr: 1 blobs_lr: 2 weight_decay: 1
                 weight_decay: 0 } bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pad2" type: "padding" pad: 1 } bottom: "conv1" top: "pad2" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 3 stride: 2 } bottom: "pad2" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 5 alpha: 0.0001 beta: 0.75 k: 2 } bottom: "pool1"
         top: "norm1" }
layers { layer { name: "cat" type: "concat" concat_dim: 1 } bottom: "norm1" bottom: "norm1" top: "cat" }
layers { layer { name: "fc" type: "innerproduct" num_output: 10 bias_filler { type: "constant" value: 1 } }
         bottom: "cat" top: "fc" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 } bottom: "fc" top: "fc" }
layers { layer { name: "prob" type: "softmax" } bottom: "fc" top: "prob" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc" bottom: "label" }
layers { layer { name: "acc" type: "accuracy" } bottom: "prob" bottom: "label" top: "acc" }
"""


def caffe_upgrade(install, text: str, tmp_path: Path):
    source, target = tmp_path / "v0.prototxt", tmp_path / "upgraded.prototxt"
    source.write_text(text)
    done = subprocess.run([str(install.tool("upgrade_net_proto_text")), str(source), str(target)],
                          capture_output=True, text=True, env={**install.env(), "GLOG_minloglevel": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    return prototxt.load(target)


@pytest.mark.parametrize("text", [V0_EVERYTHING, (DATA / "lenet_v0.prototxt").read_text()],
                         ids=["every-field", "lenet"])
def test_upgrade_equals_caffes_upgrade_net_proto_text(text, caffe_install, tmp_path):
    original = prototxt.parse(text)
    assert upgrade.is_v0(original)
    ours, notes = upgrade.to_current(original)
    assert ours == caffe_upgrade(caffe_install, text, tmp_path)
    assert notes == [] and not upgrade.is_v0(ours) and not layers.is_v1(ours)
    assert original == prototxt.parse(text), "the caller's message is not modified"


def test_padding_layers_fold_into_the_layer_reading_them():
    net, _ = upgrade.to_current(prototxt.parse(V0_EVERYTHING))
    by_name = {layer.name: layer for layer in net.layer}
    assert "pad1" not in by_name and list(by_name["conv1"].bottom) == ["data"]
    assert list(by_name["conv1"].convolution_param.pad) == [2] and by_name["pool1"].pooling_param.pad == 1


def test_a_padding_layer_before_another_type_is_refused():
    text = """layers { layer { name: "pad" type: "padding" pad: 1 } bottom: "x" top: "p" }
              layers { layer { name: "fc" type: "innerproduct" num_output: 2 } bottom: "p" top: "fc" }"""
    with pytest.raises(NetError, match="padding layer pad feeds fc"):
        upgrade.to_current(prototxt.parse(text))


def test_unknown_v0_type_is_a_typed_error():
    with pytest.raises(NetError, match="unknown V0 layer type 'warp'"):
        upgrade.to_current(prototxt.parse('layers { layer { name: "w" type: "warp" } bottom: "x" top: "y" }'))


def test_a_field_of_another_type_is_dropped_with_a_note_as_caffe_does():
    text = 'layers { layer { name: "r" type: "relu" num_output: 3 } bottom: "x" top: "x" }'
    net, notes = upgrade.to_current(prototxt.parse(text))
    assert net.layer[0].type == "ReLU" and notes == ["r: V0 field num_output does not apply to a 'relu' layer; "
                                                     "dropped (as Caffe does)"]


def test_v1_and_current_nets_are_not_v0():
    assert not upgrade.is_v0(prototxt.load(DATA / "lenet_v1.prototxt"))
    assert not upgrade.is_v0(prototxt.load(DATA / "resnet_deploy.prototxt"))


def test_layers_blocks_with_string_types_are_read_as_layer_blocks():
    text = (DATA / "mixed_keys_deploy.prototxt").read_text()
    with pytest.raises(PrototxtError):
        prototxt.parse(text)
    repaired, net, notes = upgrade.read_net(text, "mixed.prototxt")
    assert [layer.name for layer in net.layer][-1] == "prob" and not net.layers
    assert "# the last layer was written under the V1 key" in repaired and "layers {" not in repaired
    assert notes and "prob" in notes[0]


def test_read_net_keeps_the_original_parse_error_when_nothing_can_be_repaired():
    with pytest.raises(PrototxtError) as caught:
        upgrade.read_net('layer { name: "a" type: "ReLU" bogus: 1 }', "bad.prototxt")
    assert caught.value.where.startswith("bad.prototxt:1:")


def test_read_net_upgrades_v0_text_keeping_comments():
    text = (DATA / "lenet_v0.prototxt").read_text()
    written, net, notes = upgrade.read_net(text, "lenet_v0.prototxt")
    assert prototxt.parse(written) == net and "V0 net" in notes[0]
    assert "# the classifier" in written and "# 2014's V0 format" in written


@pytest.mark.parametrize("name", ["lenet_v1.prototxt", "rcnn_v1_deploy.prototxt"])
def test_v1_step_equals_caffes_upgrade_of_v1_nets(name, caffe_install, tmp_path):
    text = (DATA / name).read_text()
    ours = upgrade.upgrade_input(upgrade.v1_to_current(prototxt.parse(text)))
    assert ours == caffe_upgrade(caffe_install, text, tmp_path)
