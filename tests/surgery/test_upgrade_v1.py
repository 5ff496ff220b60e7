"""`rewrite --upgrade` writes a V1 net in the current format exactly as Caffe's upgrade_net_proto_text does,
including the data transformation fields that V1 nets keep in data_param (scale, mean_file, crop_size, mirror)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from caffetune.model import layers, prototxt
from caffetune.surgery import net_edits

# A V1 train_val whose Data/ImageData/WindowData layers keep the transformation in their own params (as 2014's nets
# did), plus a deploy-style `input:` so that the Input layer upgrade is covered too.
V1_DATA_FIELDS = """
name: "V1DataFields"
input: "extra"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "data" type: DATA top: "data" top: "label"
         data_param { source: "train_lmdb" backend: LMDB batch_size: 4 scale: 0.00390625 mean_file: "mean.binaryproto"
                      crop_size: 8 mirror: true }
         include: { phase: TRAIN } }
layers { name: "data" type: IMAGE_DATA top: "data" top: "label"
         image_data_param { source: "val.txt" batch_size: 2 crop_size: 8 mean_file: "mean.binaryproto" }
         include: { phase: TEST } }
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" blobs_lr: 1 blobs_lr: 2 weight_decay: 1
         weight_decay: 0 inner_product_param { num_output: 3 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "ip" bottom: "label" top: "loss" }
"""


def caffe_upgrade(install, text: str, tmp_path: Path):
    source, target = tmp_path / "v1.prototxt", tmp_path / "upgraded.prototxt"
    source.write_text(text)
    done = subprocess.run([str(install.tool("upgrade_net_proto_text")), str(source), str(target)],
                          capture_output=True, text=True, env={**install.env(), "GLOG_minloglevel": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    return prototxt.load(target)


def test_upgrade_v1_equals_caffes_upgrade_net_proto_text(caffe_install, tmp_path):
    original = prototxt.parse(V1_DATA_FIELDS)
    ours = net_edits.upgrade_v1(original)
    assert ours == caffe_upgrade(caffe_install, V1_DATA_FIELDS, tmp_path)
    assert original == prototxt.parse(V1_DATA_FIELDS), "the caller's message is not modified"


def test_transformation_fields_move_into_transform_param():
    net = net_edits.upgrade_v1(prototxt.parse(V1_DATA_FIELDS))
    assert not layers.is_v1(net)
    train = next(layer for layer in net.layer if layer.type == "Data")
    assert not train.data_param.HasField("scale") and not train.data_param.HasField("crop_size")
    assert (train.transform_param.scale, train.transform_param.mean_file, train.transform_param.crop_size,
            train.transform_param.mirror) == (0.00390625, "mean.binaryproto", 8, True)
    assert net.layer[0].type == "Input" and not net.input


def test_current_nets_are_copied_unchanged():
    net = prototxt.parse('layer { name: "d" type: "Input" top: "d" input_param { shape { dim: 1 } } }')
    upgraded = net_edits.upgrade_v1(net)
    assert upgraded == net and upgraded is not net
