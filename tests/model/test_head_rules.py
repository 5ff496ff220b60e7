"""The head rule (docs/heads.md) on small nets of the structures people fine-tune: what scores classes, what keeps
the class axis, what is only an activation, and heads of deploy nets with no Softmax."""
from __future__ import annotations

import pytest

from caffetune.errors import NetError
from caffetune.model import heads, prototxt

INPUT = ('layer { name: "data" type: "Input" top: "data" top: "label" '
         'input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } shape { dim: 1 } } }\n')


def conv(name: str, bottom: str, outputs: int, top: str | None = None) -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
            f'convolution_param {{ num_output: {outputs} kernel_size: 1 }} }}\n')


def fc(name: str, bottom: str, outputs: int, top: str | None = None) -> str:
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top or name}" '
            f'inner_product_param {{ num_output: {outputs} }} }}\n')


def layer(name: str, kind: str, bottoms, top: str, extra: str = "") -> str:
    bottoms = [bottoms] if isinstance(bottoms, str) else bottoms
    written = " ".join(f'bottom: "{b}"' for b in bottoms)
    return f'layer {{ name: "{name}" type: "{kind}" {written} top: "{top}" {extra} }}\n'


def names(text: str) -> list[str]:
    return [head.name for head in heads.find_heads(prototxt.parse(text))]


GLOBAL_POOL = 'pooling_param { pool: AVE global_pooling: true }'


def test_sigmoid_gates_of_squeeze_and_excitation_are_activations():
    net = (INPUT + conv("c1", "data", 8) + layer("gp", "Pooling", "c1", "gp", GLOBAL_POOL)
           + conv("down", "gp", 2) + layer("down_relu", "ReLU", "down", "down") + conv("up", "down", 8)
           + layer("gate", "Sigmoid", "up", "up") + layer("r", "Reshape", "up", "r", 'reshape_param { shape { '
                                                                                   'dim: 0 dim: 0 } }')
           + layer("scale", "Scale", ["c1", "r"], "scaled", "scale_param { axis: 0 }")
           + layer("pool", "Pooling", "scaled", "pool", GLOBAL_POOL) + fc("classifier", "pool", 5)
           + layer("prob", "Softmax", "classifier", "prob"))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert (head.name, head.consumers) == ("classifier", ("prob",))


def test_sigmoid_activations_between_convolutions_are_not_consumers():
    net = (INPUT + conv("c1", "data", 4) + layer("s1", "Sigmoid", "c1", "s1") + conv("c2", "s1", 4)
           + layer("s2", "Sigmoid", "c2", "s2") + fc("ip1", "s2", 10) + layer("prob", "Softmax", "ip1", "prob"))
    assert names(net) == ["ip1"]


def test_a_sigmoid_that_leaves_the_net_scores_labels():
    """Multi-label deploy nets end in a Sigmoid: it is the class-scoring consumer there."""
    net = INPUT + conv("c1", "data", 4) + fc("tags", "c1", 30) + layer("sig", "Sigmoid", "tags", "tags")
    (head,) = heads.find_heads(prototxt.parse(net))
    assert (head.name, head.consumers) == ("tags", ("sig",))


def test_conv_head_after_global_pooling_without_softmax():
    net = (INPUT + conv("c1", "data", 4) + layer("cat", "Concat", ["data", "c1"], "cat")
           + layer("relu", "ReLU", "cat", "cat") + layer("pool5", "Pooling", "cat", "pool5", GLOBAL_POOL)
           + conv("fc6", "pool5", 9))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert head.name == "fc6" and "pooled features of pool5" in head.reason


def test_nin_head_reaches_the_loss_through_relu_and_pooling():
    net = (INPUT + conv("cccp7", "data", 8) + conv("cccp8-1024", "cccp7", 1000, top="cccp8")
           + layer("relu", "ReLU", "cccp8", "cccp8") + layer("pool4", "Pooling", "cccp8", "pool4", GLOBAL_POOL)
           + layer("loss", "SoftmaxWithLoss", ["pool4", "label"], "loss"))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert (head.name, head.top, head.path) == ("cccp8-1024", "cccp8", ("relu", "pool4"))


def test_unscored_fc_after_relu_and_dropout_is_the_head():
    """R-CNN's deploy: fc7 -> relu7 -> drop7 -> fc-rcnn, and nothing reads fc-rcnn."""
    net = (INPUT + fc("fc7", "data", 16) + layer("relu7", "ReLU", "fc7", "fc7")
           + layer("drop7", "Dropout", "fc7", "fc7") + fc("fc-rcnn", "fc7", 200))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert head.name == "fc-rcnn" and "after" in head.reason


@pytest.mark.parametrize("tail", [
    fc("fc6", "data", 16) + layer("relu6", "ReLU", "fc6", "fc6") + fc("fc7", "fc6", 16)
    + layer("relu7", "ReLU", "fc7", "fc7"),                                   # a truncated feature extractor
    fc("ip1", "data", 10) + fc("feat", "ip1", 2),                             # the siamese embedding
    conv("c1", "data", 8) + layer("r", "ReLU", "c1", "c1") + conv("c2", "c1", 8)
    + layer("res", "Eltwise", ["c1", "c2"], "res") + fc("fc5", "res", 512),  # an embedding on a spatial map
])
def test_features_and_embeddings_are_not_heads(tail):
    with pytest.raises(NetError, match="no classifier head"):
        heads.find_heads(prototxt.parse(INPUT + tail))


def test_segment_consensus_reshape_and_pooling_keep_the_class_axis():
    net = (INPUT + fc("fc-action", "data", 101, top="fc")
           + layer("reshape_fc", "Reshape", "fc", "reshape_fc", "reshape_param { shape { dim: -1 dim: 1 dim: 3 "
                                                                  "dim: 101 } }")
           + layer("consensus", "Pooling", "reshape_fc", "pool_fusion", "pooling_param { pool: AVE kernel_h: 3 "
                                                                       "kernel_w: 1 }")
           + layer("loss", "SoftmaxWithLoss", ["pool_fusion", "label"], "loss", "softmax_param { axis: 3 }"))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert head.name == "fc-action" and head.path == ("reshape_fc", "consensus")


def test_softmax_followed_by_a_consensus_still_scores():
    """A deploy net averaging per-segment probabilities: the Softmax's output reaches the net output only through
    layers that keep the class axis."""
    net = (INPUT + fc("fc", "data", 11) + layer("prob", "Softmax", "fc", "prob")
           + layer("r", "Reshape", "prob", "r", "reshape_param { shape { dim: -1 dim: 1 dim: 3 dim: 11 } }")
           + layer("avg", "Pooling", "r", "avg", "pooling_param { pool: AVE kernel_h: 3 kernel_w: 1 }"))
    assert names(net) == ["fc"]


def test_two_streams_fused_by_eltwise_are_both_heads():
    net = (INPUT + fc("fc8_rgb", "data", 11) + fc("fc8_flow", "data", 11)
           + layer("fusion", "Eltwise", ["fc8_rgb", "fc8_flow"], "fusion")
           + layer("loss", "SoftmaxWithLoss", ["fusion", "label"], "loss"))
    assert names(net) == ["fc8_rgb", "fc8_flow"]


def test_concat_along_the_class_axis_is_not_followed():
    """Concatenating score vectors along the class axis makes one wider score: its inputs are not heads."""
    net = (INPUT + fc("a", "data", 3) + fc("b", "data", 4) + layer("cat", "Concat", ["a", "b"], "cat")
           + layer("prob", "Softmax", "cat", "prob"))
    with pytest.raises(NetError, match="no classifier head"):
        heads.find_heads(prototxt.parse(net))
    along_batch = net.replace('top: "cat" ', 'top: "cat" concat_param { axis: 0 } ')
    with pytest.raises(NetError, match="ambiguous"):   # 3 vs 4 classes joined along the batch axis
        heads.find_heads(prototxt.parse(along_batch))


def test_regression_and_metric_losses_do_not_score_classes():
    net = (INPUT + fc("fc5", "data", 64) + fc("fc6", "fc5", 10)
           + layer("center", "CenterLoss", ["fc5", "label"], "center") + layer("euclid", "EuclideanLoss",
                                                                               ["fc5", "label"], "euclid")
           + layer("loss", "SoftmaxWithLoss", ["fc6", "label"], "loss"))
    assert names(net) == ["fc6"]


def test_fork_class_losses_are_recognised_by_name():
    net = INPUT + fc("cls", "data", 21) + layer("loss", "SoftmaxWithLossOHEM", ["cls", "label"], "loss")
    assert heads.is_class_scoring(prototxt.parse(net).layer, 2)


def test_ambiguity_ranks_every_candidate_with_its_reason():
    net = (INPUT + fc("age", "data", 8) + fc("gender", "data", 2) + layer("age_prob", "Softmax", "age", "ap")
           + layer("gender_loss", "SoftmaxWithLoss", ["gender", "label"], "gl")
           + layer("gender_acc", "Accuracy", ["gender", "label"], "ga"))
    with pytest.raises(NetError) as caught:
        heads.find_heads(prototxt.parse(net))
    what = caught.value.what
    assert "1. gender (InnerProduct, num_output 2): its scores reach SoftmaxWithLoss gender_loss, Accuracy " \
           "gender_acc" in what
    assert "2. age (InnerProduct, num_output 8): its scores reach Softmax age_prob" in what
    assert "--head" in caught.value.fix


def test_graph_helpers_are_public_for_other_analyses():
    entries = list(prototxt.parse(INPUT + fc("fc", "data", 3) + layer("drop", "Dropout", "fc", "fc")).layer)
    assert heads.net_outputs(entries) == {"fc", "label"}
    assert heads.producer(entries, "fc", 3) == 2 and heads.readers(entries, "fc", 1) == [2]
    assert heads.score_sources(entries, "fc", 3) == ([1], [2])


def test_an_autoencoders_reconstruction_loss_scores_no_classes():
    net = (INPUT + layer("flat", "Flatten", "data", "flatdata") + fc("encode", "data", 8)
           + layer("enc_sig", "Sigmoid", "encode", "encode") + fc("decode", "encode", 192)
           + layer("loss", "SigmoidCrossEntropyLoss", ["decode", "flatdata"], "loss"))
    with pytest.raises(NetError, match="no classifier head"):
        heads.find_heads(prototxt.parse(net))


def test_unscored_head_on_compact_bilinear_pooled_and_normalised_features():
    """A fine-grained (bilinear CNN) deploy net: conv features -> CompactBilinear -> signed sqrt (in place) ->
    L2 Normalize -> fc, with no Softmax: the pooled, normalised vector is a feature vector."""
    net = (INPUT + conv("conv5_3", "data", 8) + layer("relu5_3", "ReLU", "conv5_3", "conv5_3")
           + layer("bilinear", "CompactBilinear", ["conv5_3", "conv5_3"], "bilinear")
           + layer("signed_sqrt", "SignedSqrt", "bilinear", "bilinear")
           + layer("l2", "Normalize", "bilinear", "l2") + fc("fc8_cub", "l2", 200))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert head.name == "fc8_cub" and "CompactBilinear pooled features of bilinear" in head.reason


def test_a_python_layer_is_not_taken_for_a_feature_pooling():
    """What a Python layer computes is unknown: an unscored fc after one is not guessed to be a classifier."""
    net = (INPUT + conv("c", "data", 8) + layer("py", "Python", "c", "py", 'python_param { module: "m" layer: "L" }')
           + fc("fc", "py", 5))
    with pytest.raises(NetError, match="no classifier head"):
        heads.find_heads(prototxt.parse(net))


def test_probabilities_read_only_by_a_silence_layer_still_score():
    """Silence consumes a blob so that Caffe does not print it: the Softmax's output still leaves the net."""
    net = (INPUT + conv("c", "data", 8) + layer("gp", "Pooling", "c", "gp", GLOBAL_POOL) + fc("fc8", "gp", 10)
           + layer("prob", "Softmax", "fc8", "prob") + 'layer { name: "mute" type: "Silence" bottom: "prob" }\n')
    (head,) = heads.find_heads(prototxt.parse(net))
    assert (head.name, head.consumers) == ("fc8", ("prob",))


def test_squeeze_and_excitation_through_an_axpy_layer():
    """SE-ResNeXt's blocks end in Axpy (gate * residual + shortcut): the in-place Sigmoid gate is read by Axpy, so
    it is an activation and the excitation convs are not heads."""
    net = (INPUT + conv("c1", "data", 8) + layer("gp", "Pooling", "c1", "gp", GLOBAL_POOL) + conv("down", "gp", 2)
           + layer("down_relu", "ReLU", "down", "down") + conv("up", "down", 8)
           + layer("gate", "Sigmoid", "up", "up") + layer("axpy", "Axpy", ["up", "c1", "data"], "block")
           + layer("pool5", "Pooling", "block", "pool5", GLOBAL_POOL) + fc("classifier", "pool5", 5)
           + layer("prob", "Softmax", "classifier", "prob"))
    assert names(net) == ["classifier"]


def test_accuracy_on_the_softmax_output_and_loss_on_the_scores_agree():
    net = (INPUT + conv("c", "data", 4) + layer("gp", "Pooling", "c", "gp", GLOBAL_POOL) + fc("fc8", "gp", 10)
           + layer("prob", "Softmax", "fc8", "prob") + layer("acc", "Accuracy", ["prob", "label"], "acc")
           + layer("loss", "SoftmaxWithLoss", ["fc8", "label"], "loss"))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert head.name == "fc8" and set(head.consumers) == {"prob", "loss"}


def test_lstm_scores_along_axis_two():
    """LRCN: fc8 (axis 2) on an LSTM's (T, N, D) output, scored by a Softmax along axis 2."""
    net = (INPUT + fc("fc6", "data", 16) + layer("rs", "Reshape", "fc6", "rs", "reshape_param { shape { dim: 1 "
                                                                                "dim: 1 dim: 16 } }")
           + 'layer { name: "lstm1" type: "LSTM" bottom: "rs" bottom: "label" top: "lstm1" '
             'recurrent_param { num_output: 8 } }\n'
           + 'layer { name: "fc8-final" type: "InnerProduct" bottom: "lstm1" top: "fc8-final" '
             'inner_product_param { num_output: 101 axis: 2 } }\n'
           + layer("probs", "Softmax", "fc8-final", "probs", "softmax_param { axis: 2 }"))
    assert names(net) == ["fc8-final"]


def test_unscored_head_after_a_max_feature_map():
    """LightCNN-style face classifier deploy: fc1 -> Slice -> Eltwise MAX (max-feature-map, an activation) ->
    Dropout -> fc2, with no Softmax."""
    mfm = ('layer { name: "slice" type: "Slice" bottom: "fc1" top: "s1" top: "s2" slice_param { axis: 1 } }\n'
           'layer { name: "mfm" type: "Eltwise" bottom: "s1" bottom: "s2" top: "mfm" '
           'eltwise_param { operation: MAX } }\n')
    net = (INPUT + conv("c", "data", 8) + fc("fc1", "c", 16) + mfm + layer("drop", "Dropout", "mfm", "mfm")
           + fc("fc2", "mfm", 10575))
    (head,) = heads.find_heads(prototxt.parse(net))
    assert head.name == "fc2" and "features of fc1 after mfm" in head.reason
    summed = net.replace("operation: MAX", "operation: SUM")     # a sum of two halves is not an activation
    with pytest.raises(NetError, match="no classifier head"):
        heads.find_heads(prototxt.parse(summed))
