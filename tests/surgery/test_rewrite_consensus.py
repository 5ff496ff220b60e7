"""Segment-consensus nets (temporal segment networks): the head's scores are regrouped by a Reshape that spells the
class count, averaged by a Pooling and scored along axis 3. The rewrite resizes the Reshape too, keeps every comment
and the one-line layout, is stable, and the outputs build and run in the real Caffe."""
from __future__ import annotations

from caffetune.model import prototxt, textedit
from caffetune.surgery import rewrite
from caffetune.surgery.net_edits import DataOptions

from helpers import run_pycaffe, write_tiny_lmdb

TSN_LIKE = """name: "SegmentConsensus"
layer { name: "data" type: "Data" top: "data" top: "label" include: { phase: TRAIN }
  transform_param { mirror: true crop_size: 8 mean_value: [104, 117, 123] }
  data_param { source: "train_lmdb" batch_size: 3 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include: { phase: TEST }
  transform_param { mirror: false crop_size: 8 mean_value: [104, 117, 123] }
  data_param { source: "val_lmdb" batch_size: 3 backend: LMDB } }
# one label per group of 3 segments (the original's video data layer gives one per video)
layer { name: "label_groups" type: "Reshape" bottom: "label" top: "label_groups" reshape_param { shape { dim: -1 dim: 3 } } }
layer { name: "label_slice" type: "Slice" bottom: "label_groups" top: "video_label" top: "other_labels" slice_param { axis: 1 slice_point: 1 } }
layer { name: "silence" type: "Silence" bottom: "other_labels" }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }

####################################### global pool #######################################
layer { name: "global_pool" top: "global_pool" bottom: "conv1" type: "Pooling"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "dropout" top: "global_pool" bottom: "global_pool" type: "Dropout"
 dropout_param { dropout_ratio: 0.8 } }

####################################### loss accuracy #######################################
layer { name: "fc-action" type: "InnerProduct" bottom: "global_pool" top: "fc"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 101
    weight_filler { type: "gaussian" std: 0.001 }
    bias_filler { type: "constant" value: 0 } }}
layer { name: "reshape_fc" type: "Reshape" bottom: "fc" top: "reshape_fc" reshape_param { shape { dim: [-1, 1, 3, 101] } } }
layer { name: "segment_consensus" type: "Pooling" bottom: "reshape_fc" top: "pool_fusion" pooling_param { pool: AVE kernel_h: 3 kernel_w: 1 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool_fusion" bottom: "video_label" top: "loss" softmax_param { axis: 3} }
layer { name: "accuracy_top1" type: "Accuracy" bottom: "pool_fusion" bottom: "video_label" top: "accuracy" accuracy_param {axis:3}
  include { phase: TEST } }
"""  # noqa: E501 - the one-line layout of the original nets is the point

FORWARD = """
    import sys, caffe
    caffe.set_mode_cpu()
    train = caffe.Net(sys.argv[1], caffe.TRAIN)
    train.forward()
    print("scores", train.blobs["pool_fusion"].data.shape)
    deploy = caffe.Net(sys.argv[2], caffe.TEST)
    print("prob", deploy.forward()["prob"].shape)
"""


def test_consensus_reshape_follows_the_new_class_count():
    result = rewrite.rewrite_text(TSN_LIKE, rewrite.Options(classes=5, name="ft"))
    text = result.outputs["train_val"].text
    assert "dim: [-1, 1, 3, 5]" in text and 'name: "fc-action_ft"' in text
    assert any("reshape_fc" in note for note in result.notes)
    assert textedit.comments_in(text) == textedit.comments_in(TSN_LIKE)
    assert text.count("\n") == TSN_LIKE.count("\n"), "one-line layers stay on one line"
    again = rewrite.rewrite_text(text, rewrite.Options(classes=5, name="ft"))
    assert again.outputs["train_val"].text == text
    assert not any("reshape_fc" in note for note in again.notes)


def test_deploy_scores_each_sample_without_the_consensus():
    result = rewrite.rewrite_text(TSN_LIKE, rewrite.Options(classes=5, name="ft"))
    deploy = prototxt.parse(result.outputs["deploy"].text)
    names = [layer.name for layer in deploy.layer]
    assert "reshape_fc" not in names and names[-2:] == ["fc-action_ft", "prob"]
    assert list(deploy.layer[-1].bottom) == ["fc"]


def test_consensus_outputs_run_in_real_caffe(caffe_install, tmp_path):
    source = write_tiny_lmdb(tmp_path / "lmdb", count=6, height=8, width=8)
    data = DataOptions(train_source=str(source), val_source=str(source), batch_size=3)
    result = rewrite.rewrite_text(TSN_LIKE, rewrite.Options(classes=5, name="ft", data=data))
    (tmp_path / "train_val.prototxt").write_text(result.outputs["train_val"].text)
    (tmp_path / "deploy.prototxt").write_text(result.outputs["deploy"].text)
    done = run_pycaffe(caffe_install, FORWARD, str(tmp_path / "train_val.prototxt"),
                       str(tmp_path / "deploy.prototxt"))
    assert "scores (1, 1, 1, 5)" in done.stdout and "prob (1, 5)" in done.stdout
