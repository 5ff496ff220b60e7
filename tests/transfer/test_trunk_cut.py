"""Where a net splits into a frozen trunk and a trainable top (run --cache-features), on small nets written here
with the structure of the real ones (a backbone + new head, a Keras-style Dense+Dense top, GoogLeNet's three
heads, CaffeNet's dropout before the head)."""
from __future__ import annotations

import pytest

from caffetune.errors import NetError
from caffetune.model import prototxt
from caffetune.transfer import feature_cache, mirror_replay, top_net, trunk_cut

DATA = """name: "n"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "/nonexistent/train" backend: LMDB batch_size: 8 } transform_param { {train_transform} } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "/nonexistent/val" backend: LMDB batch_size: 4 } transform_param { scale: 0.5 } }
"""
FROZEN = 'param { lr_mult: 0 } param { lr_mult: 0 }'
CONV = ('layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" {param} '
        'convolution_param {{ num_output: 4 kernel_size: 3 }} }}\n')
RELU = 'layer {{ name: "relu_{blob}" type: "ReLU" bottom: "{blob}" top: "{blob}" }}\n'
FC = ('layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {param} '
      'inner_product_param {{ num_output: {out} }} }}\n')
LOSS = 'layer {{ name: "{name}" type: "SoftmaxWithLoss" bottom: "{bottom}" bottom: "label" top: "{name}" }}\n'
ACCURACY = ('layer { name: "accuracy" type: "Accuracy" bottom: "head" bottom: "label" top: "accuracy" '
            'include { phase: TEST } }\n')


def net(body: str, train_transform: str = "scale: 0.5"):
    return prototxt.parse(DATA.replace("{train_transform}", train_transform) + body)


def backbone() -> str:
    return (CONV.format(name="conv1", bottom="data", param=FROZEN) + RELU.format(blob="conv1")
            + CONV.format(name="conv2", bottom="conv1", param=FROZEN) + RELU.format(blob="conv2"))


def test_a_frozen_backbone_and_a_new_head():
    cut = trunk_cut.find_cut(net(backbone() + FC.format(name="head", bottom="conv2", top="head", param="", out=3)
                                 + ACCURACY + LOSS.format(name="loss", bottom="head")))
    assert cut.trunk == ["conv1", "relu_conv1", "conv2", "relu_conv2"]
    assert cut.frozen == ["conv1", "conv2"]
    assert cut.phases["TRAIN"].blobs == ["conv2", "label"]
    assert cut.phases["TEST"].blobs == ["conv2", "label"]
    assert cut.top == {"head": ["TRAIN", "TEST"], "accuracy": ["TEST"], "loss": ["TRAIN", "TEST"]}
    assert cut.trainable == ["head"]


def test_a_two_layer_top_keras_style():
    body = (backbone() + FC.format(name="dense", bottom="conv2", top="dense", param="", out=16)
            + RELU.format(blob="dense") + FC.format(name="head", bottom="dense", top="head", param="", out=3)
            + ACCURACY + LOSS.format(name="loss", bottom="head"))
    cut = trunk_cut.find_cut(net(body))
    assert cut.phases["TRAIN"].blobs == ["conv2", "label"]
    assert cut.trainable == ["dense", "head"]
    assert list(cut.top) == ["dense", "relu_dense", "head", "accuracy", "loss"]


def test_googlenet_like_three_heads_give_three_cut_blobs():
    body = (CONV.format(name="conv1", bottom="data", param=FROZEN) + RELU.format(blob="conv1")
            + FC.format(name="aux1/fc", bottom="conv1", top="aux1/fc", param=FROZEN, out=8)
            + RELU.format(blob="aux1/fc")
            + FC.format(name="aux1/classifier", bottom="aux1/fc", top="aux1/classifier", param="", out=3)
            + LOSS.format(name="loss1", bottom="aux1/classifier")
            + CONV.format(name="conv2", bottom="conv1", param=FROZEN) + RELU.format(blob="conv2")
            + FC.format(name="aux2/fc", bottom="conv2", top="aux2/fc", param=FROZEN, out=8)
            + FC.format(name="aux2/classifier", bottom="aux2/fc", top="aux2/classifier", param="", out=3)
            + LOSS.format(name="loss2", bottom="aux2/classifier")
            + FC.format(name="head", bottom="conv2", top="head", param="", out=3)
            + ACCURACY + LOSS.format(name="loss3", bottom="head"))
    cut = trunk_cut.find_cut(net(body))
    assert cut.phases["TRAIN"].blobs == ["aux1/fc", "label", "aux2/fc", "conv2"]
    assert cut.trainable == ["aux1/classifier", "aux2/classifier", "head"]
    names = feature_cache.dataset_names(cut.phases["TRAIN"].blobs)
    assert names == {"aux1/fc": "aux1_fc", "label": "label", "aux2/fc": "aux2_fc", "conv2": "conv2"}
    top = top_net.build(net(body), cut, {"TRAIN": "/f/train.txt", "TEST": "/f/test.txt"},
                        {"TRAIN": names, "TEST": feature_cache.dataset_names(cut.phases["TEST"].blobs)},
                        {"TRAIN": 8, "TEST": 4})
    text = prototxt.format(top)
    assert 'bottom: "aux1_fc"' in text and "aux1/fc" not in text.replace('name: "aux1/fc"', "")
    assert [layer.type for layer in top.layer[:2]] == ["HDF5Data", "HDF5Data"]
    assert list(top.layer[0].top) == ["aux1_fc", "label", "aux2_fc", "conv2"]
    assert top.layer[0].hdf5_data_param.batch_size == 8 and top.layer[1].hdf5_data_param.batch_size == 4
    assert prototxt.format(prototxt.parse(text)) == text


def test_dropout_at_the_cut_moves_to_the_top_and_frozen_layers_after_it_follow():
    body = (backbone() + FC.format(name="fc6", bottom="conv2", top="fc6", param=FROZEN, out=8)
            + RELU.format(blob="fc6")
            + 'layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" }\n'
            + FC.format(name="fc7", bottom="fc6", top="fc7", param=FROZEN, out=8)
            + FC.format(name="head", bottom="fc7", top="head", param="", out=3)
            + ACCURACY + LOSS.format(name="loss", bottom="head"))
    cut = trunk_cut.find_cut(net(body))
    assert cut.trunk[-2:] == ["fc6", "relu_fc6"]
    assert cut.phases["TRAIN"].blobs == ["fc6", "label"]
    assert list(cut.top)[:3] == ["drop6", "fc7", "head"]
    assert any("drop6" in note for note in cut.notes) and any("fc7" in note for note in cut.notes)


def test_batchnorm_is_trunk_only_with_global_stats():
    bn = 'layer {{ name: "bn" type: "BatchNorm" bottom: "conv1" top: "conv1" {stats} }}\n'
    tail = (CONV.format(name="conv2", bottom="conv1", param=FROZEN)
            + FC.format(name="head", bottom="conv2", top="head", param="", out=3) + LOSS.format(name="loss",
                                                                                              bottom="head"))
    start = CONV.format(name="conv1", bottom="data", param=FROZEN)
    frozen = trunk_cut.find_cut(net(start + bn.format(stats="batch_norm_param { use_global_stats: true }") + tail))
    assert "bn" in frozen.trunk and frozen.phases["TRAIN"].blobs == ["conv2", "label"]
    moving = trunk_cut.find_cut(net(start + bn.format(stats="") + tail))
    assert "bn" not in moving.trunk and moving.phases["TRAIN"].blobs == ["conv1", "label"]
    assert "conv2" in moving.top                       # after a trainable layer, frozen layers run in the top


def test_a_trunk_layer_changing_a_blob_the_top_already_read_goes_to_the_top():
    body = (CONV.format(name="conv1", bottom="data", param=FROZEN)
            + FC.format(name="side", bottom="conv1", top="side", param="", out=3)
            + RELU.format(blob="conv1") + FC.format(name="head", bottom="conv1", top="head", param="", out=3)
            + LOSS.format(name="loss", bottom="head") + LOSS.format(name="loss_side", bottom="side"))
    cut = trunk_cut.find_cut(net(body))
    assert cut.trunk == ["conv1"] and "relu_conv1" in cut.top
    assert cut.phases["TRAIN"].blobs == ["conv1", "label"]


def test_nothing_frozen_or_nothing_trainable_is_refused_with_the_reason():
    trainable = (CONV.format(name="conv1", bottom="data", param="")
                 + FC.format(name="head", bottom="conv1", top="head", param="", out=3)
                 + LOSS.format(name="loss", bottom="head"))
    with pytest.raises(NetError, match="nothing to cache") as error:
        trunk_cut.find_cut(net(trainable))
    assert "--freeze backbone" in error.value.fix
    frozen = backbone() + FC.format(name="head", bottom="conv2", top="head", param=FROZEN, out=3) + LOSS.format(
        name="loss", bottom="head")
    with pytest.raises(NetError, match="nothing to train"):
        trunk_cut.find_cut(net(frozen))


@pytest.mark.parametrize("transform, reason", [("crop_size: 4", "random crop"), ("mirror: true", None)])
def test_transforms_random_crops_are_refused_mirror_is_replayed(transform, reason):
    body = backbone() + FC.format(name="head", bottom="conv2", top="head", param="", out=3) + LOSS.format(
        name="loss", bottom="head")
    cut = trunk_cut.find_cut(net(body, train_transform=transform))
    if reason:
        with pytest.raises(NetError, match=reason):
            feature_cache.check_transform(cut)
    else:
        assert feature_cache.check_transform(cut).mirror


def test_the_trunk_net_reads_in_order_without_mirror_in_test():
    body = backbone() + FC.format(name="head", bottom="conv2", top="head", param="", out=3) + LOSS.format(
        name="loss", bottom="head")
    the_net = net(body, train_transform="mirror: true scale: 0.5")
    cut = trunk_cut.find_cut(the_net)
    trunk = feature_cache.trunk_net(the_net, cut.phases["TRAIN"])
    assert [layer.name for layer in trunk.layer] == ["data", "conv1", "relu_conv1", "conv2", "relu_conv2"]
    assert not trunk.layer[0].transform_param.mirror and trunk.layer[0].transform_param.scale == 0.5
    assert all(not len(layer.include) for layer in trunk.layer)
    assert trunk.layer[0].data_param.source == "/nonexistent/train"


def test_mirror_draws_replay_caffes_generator_chain():
    # boost::mt19937(7): its second output seeds the transformer; a fixed seed gives a fixed flip sequence.
    first = mirror_replay.transformer_draws(7, 16)
    assert (first == mirror_replay.transformer_draws(7, 16)).all()
    assert not (first == mirror_replay.transformer_draws(8, 16)).all()
    import numpy as np

    reference = np.random.MT19937()
    reference._legacy_seeding(5489)                  # std::mt19937's default seed: 3499211612 first
    assert int(reference.random_raw(1)[0]) == 3499211612
