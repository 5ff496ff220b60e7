"""The uniform layer view over current and legacy V1 nets."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffetune.errors import NetError
from caffetune.model import layers, prototxt

DATA = Path(__file__).resolve().parents[1] / "data" / "rewrite"

V2 = """
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 8 kernel_size: 1 bias_term: false } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "scale2" type: "Scale" bottom: "conv" bottom: "s" top: "x" }
layer { name: "deconv" type: "Deconvolution" bottom: "conv" top: "up" convolution_param { num_output: 3 } }
layer { name: "relu" type: "ReLU" bottom: "up" top: "up" }
layer { name: "fc" type: "InnerProduct" bottom: "up" top: "fc" param { lr_mult: 10 } param { lr_mult: 20 }
  inner_product_param { num_output: 5 } }
layer { name: "prelu" type: "PReLU" bottom: "fc" top: "fc" }
"""


def test_v2_types_blobs_and_params():
    net = prototxt.parse(V2)
    assert not layers.is_v1(net)
    view = {layer.name: layer for layer in layers.all_layers(net)}
    counts = {name: layers.learnable_blob_count(layer) for name, layer in view.items()}
    assert counts == {"conv": 1, "bn": 3, "scale": 2, "scale2": 0, "deconv": 2, "relu": 0, "fc": 2, "prelu": 1}
    assert layers.param_message(view["deconv"]).num_output == 3        # Deconvolution uses convolution_param
    assert layers.param_message(view["relu"]) is view["relu"].relu_param
    assert layers.num_output(view["fc"]) == 5
    assert layers.lr_mults(view["fc"]) == [10, 20]
    assert layers.lr_mults(view["conv"]) == [1.0]
    assert layers.is_in_place(view["relu"]) and not layers.is_in_place(view["fc"])


def test_v1_enum_types_map_to_current_type_strings():
    net = prototxt.load(DATA / "lenet_v1.prototxt")
    assert layers.is_v1(net)
    assert [layers.type_name(layer) for layer in layers.all_layers(net)] == [
        "Data", "Data", "Convolution", "ReLU", "InnerProduct", "Accuracy", "SoftmaxWithLoss"]
    ip1 = layers.all_layers(net)[4]
    assert layers.learnable_blob_count(ip1) == 2
    assert layers.lr_mults(ip1) == [1, 2] and layers.decay_mults(ip1) == [1, 0]
    assert layers.param_message(ip1).num_output == 10
    assert layers.phases(layers.all_layers(net)[0]) == {"TRAIN"}


def test_every_v1_enum_value_round_trips():
    descriptor = prototxt.parse("").DESCRIPTOR.fields_by_name["layers"].message_type
    for value in descriptor.fields_by_name["type"].enum_type.values:
        if value.name != "NONE":
            assert layers.v1_type_value(descriptor, layers.v1_enum_to_type(value.name)) == value.number
    assert layers.v1_enum_to_type("SOFTMAX_LOSS") == "SoftmaxWithLoss"
    assert layers.v1_enum_to_type("INNER_PRODUCT") == "InnerProduct"


def test_a_net_mixing_layer_and_layers_is_an_error():
    net = prototxt.parse('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }')
    with pytest.raises(NetError, match="mixes"):
        layers.check_not_mixed(net)
