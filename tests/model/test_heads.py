"""Classifier head detection."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffetune.errors import NetError
from caffetune.model import heads, prototxt
from caffetune.surgery import lr_policy

DATA = Path(__file__).resolve().parents[1] / "data" / "rewrite"

SQUEEZENET_TAIL = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "fire9" type: "Convolution" bottom: "data" top: "fire9"
  convolution_param { num_output: 8 kernel_size: 1 } }
layer { name: "drop9" type: "Dropout" bottom: "fire9" top: "fire9" }
layer { name: "conv10" type: "Convolution" bottom: "fire9" top: "conv10"
  convolution_param { num_output: 1000 kernel_size: 1 } }
layer { name: "relu_conv10" type: "ReLU" bottom: "conv10" top: "conv10" }
layer { name: "pool10" type: "Pooling" bottom: "conv10" top: "pool10" pooling_param { pool: AVE global_pooling: true } }
layer { name: "prob" type: "Softmax" bottom: "pool10" top: "prob" }
"""


def test_caffenet_has_one_head(caffe_source):
    net = prototxt.load(caffe_source / "models/bvlc_reference_caffenet/train_val.prototxt")
    (head,) = heads.find_heads(net)
    assert (head.name, head.type, head.num_output, head.top) == ("fc8", "InnerProduct", 1000, "fc8")
    assert set(head.consumers) == {"accuracy", "loss"}


def test_googlenet_train_val_has_three_heads(caffe_source):
    net = prototxt.load(caffe_source / "models/bvlc_googlenet/train_val.prototxt")
    found = heads.find_heads(net)
    assert [h.name for h in found] == ["loss1/classifier", "loss2/classifier", "loss3/classifier"]
    assert all(h.num_output == 1000 for h in found)
    assert found[0].index < found[1].index < found[2].index


def test_squeezenet_head_is_a_1x1_convolution_through_relu_and_pooling():
    (head,) = heads.find_heads(prototxt.parse(SQUEEZENET_TAIL))
    assert (head.name, head.type, head.num_output) == ("conv10", "Convolution", 1000)


def test_v1_and_batchnorm_nets():
    assert [h.name for h in heads.find_heads(prototxt.load(DATA / "lenet_v1.prototxt"))] == ["ip1"]
    assert [h.name for h in heads.find_heads(prototxt.load(DATA / "resnet_deploy.prototxt"))] == ["fc_nsfw"]


def test_head_override_and_unknown_name_lists_candidates():
    net = prototxt.parse(SQUEEZENET_TAIL)
    assert [h.name for h in heads.find_heads(net, names=["fire9"])] == ["fire9"]
    with pytest.raises(NetError) as caught:
        heads.find_heads(net, names=["fc8"])
    assert "conv10" in caught.value.fix and "fire9" in caught.value.fix


def test_no_head_is_an_error_listing_candidates():
    net = prototxt.parse('layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" '
                         'inner_product_param { num_output: 3 } }')
    with pytest.raises(NetError, match="no classifier head") as caught:
        heads.find_heads(net)
    assert "fc (InnerProduct, num_output 3)" in caught.value.fix


def test_heads_with_different_class_counts_are_ambiguous():
    net = prototxt.parse("""
        layer { name: "a" type: "InnerProduct" bottom: "x" top: "a" inner_product_param { num_output: 3 } }
        layer { name: "b" type: "InnerProduct" bottom: "x" top: "b" inner_product_param { num_output: 4 } }
        layer { name: "pa" type: "Softmax" bottom: "a" top: "pa" }
        layer { name: "pb" type: "Softmax" bottom: "b" top: "pb" }""")
    with pytest.raises(NetError, match="ambiguous") as caught:
        heads.find_heads(net)
    assert "a (InnerProduct, num_output 3)" in caught.value.what and "--head" in caught.value.fix


def test_layer_states(caffe_source):
    net = prototxt.load(caffe_source / "models/finetune_flickr_style/train_val.prototxt")
    states = lr_policy.layer_states(net)
    assert states["fc8_flickr"] == "new" and states["conv1"] == "fine-tuned"
    assert set(states) == {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8_flickr"}
    frozen = prototxt.parse('layer { name: "c" type: "Convolution" param { lr_mult: 0 } param { lr_mult: 0 } '
                            'convolution_param { num_output: 2 } } '
                            'layer { name: "bn" type: "BatchNorm" batch_norm_param { use_global_stats: true } }')
    assert lr_policy.layer_states(frozen) == {"c": "frozen", "bn": "frozen"}
