"""Detection and segmentation nets rewritten for a new class count: every class-dependent layer and setting found
from the graph (SSD-, Faster-R-CNN-, R-FCN-, FCN- and SegNet-like nets written for these tests), changed together,
or the net refused with the layers named. Fork layers use a small test-only schema extension of the pinned
caffe.proto (tests/data/dense/fork_extension.proto.txt)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from caffetune.errors import NetError
from caffetune.model import layers, prototxt, schema
from caffetune.surgery import class_layers, rewrite

DATA = Path(__file__).resolve().parents[1] / "data" / "dense"
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "class_layers"


@pytest.fixture(scope="module")
def fork_proto(tmp_path_factory) -> Path:
    """The pinned caffe.proto plus the fork messages of tests/data/dense (compiled by caffetune like --proto)."""
    from caffetune._generated import caffe_schema

    text = Path(caffe_schema.SOURCE).read_text()
    text = text.replace("message LayerParameter {", "message LayerParameter {\n" +
                        (DATA / "layer_fields.txt").read_text(), 1)
    text = text.replace("message LossParameter {", "message LossParameter {\n  repeated float class_weighting = 9010;", 1)
    path = tmp_path_factory.mktemp("fork") / "caffe.proto"
    path.write_text(text + "\n" + (DATA / "fork_extension.proto.txt").read_text())
    return path


@pytest.fixture
def fork(fork_proto):
    schema.use(fork_proto)
    yield fork_proto
    schema.use(None)


def _rewrite(name: str, classes: int = 3, **options) -> rewrite.Result:
    text = (DATA / name).read_text()
    return rewrite.rewrite_text(text, rewrite.Options(classes=classes, name="new", **options), path=name)


def _net(result: rewrite.Result, role: str = "train_val"):
    return prototxt.parse(result.outputs[role].text)


def _layer(net, name: str):
    return next(layer for layer in layers.all_layers(net) if layer.name == name)


def _again(result: rewrite.Result, classes: int, role: str = "train_val", **options) -> None:
    """Re-parses, and rewriting the output again with the same options changes nothing."""
    text = result.outputs[role].text
    second = rewrite.rewrite_text(text, rewrite.Options(classes=classes, name="new", **options))
    assert second.outputs[role].text == text


def test_ssd_train_conf_layers_and_num_classes_change_together(fork):
    result = _rewrite("ssd_like_train.prototxt", classes=3)
    assert [head.name for head in result.heads] == ["q_a", "q_b"]      # the loc layers p_a/p_b are class-agnostic
    net = _net(result)
    assert layers.num_output(_layer(net, "q_a_new")) == 3 * 3 and layers.num_output(_layer(net, "q_b_new")) == 6 * 3
    assert layers.num_output(_layer(net, "p_a")) == 12 and layers.num_output(_layer(net, "p_b")) == 24
    assert _layer(net, "loss").multibox_loss_param.num_classes == 3
    assert list(_layer(net, "q_a_perm").bottom) == ["q_a_new"]
    assert [p.lr_mult for p in _layer(net, "q_a_new").param] == [10, 20]
    assert any("3 outputs = 2 object classes + background" in note for note in result.notes)
    assert "# 3 priors x 5 classes" in result.outputs["train_val"].text, "comments are kept"
    assert "deploy" not in result.outputs
    _again(result, 3)


def test_ssd_deploy_reshape_dim_and_detection_output_follow(fork):
    result = _rewrite("ssd_like_deploy.prototxt", classes=4)
    assert list(result.outputs) == ["deploy"] and result.input_kind == "deploy"
    net = _net(result, "deploy")
    assert list(_layer(net, "conf_reshape").reshape_param.shape.dim) == [0, -1, 4]
    assert _layer(net, "detection_out").detection_output_param.num_classes == 4
    assert layers.num_output(_layer(net, "q_a_new")) == 12
    _again(result, 4, role="deploy")


def test_ssd_without_shared_locations_rewrites_the_per_class_boxes(fork):
    text = (DATA / "ssd_like_deploy.prototxt").read_text().replace("share_location: true", "share_location: false")
    text = text.replace("num_output: 12 kernel_size", "num_output: 60 kernel_size")   # 3 priors x 4 x 5 classes
    result = rewrite.rewrite_text(text, rewrite.Options(classes=2, name="new"))
    assert layers.num_output(_layer(_net(result, "deploy"), "p_a_new")) == 3 * 4 * 2


def test_faster_rcnn_class_and_box_layers_and_python_counts(fork):
    result = _rewrite("faster_like_train.prototxt", classes=3)
    assert [head.name for head in result.heads] == ["which", "where"]
    net = _net(result)
    assert layers.num_output(_layer(net, "which_new")) == 3 and layers.num_output(_layer(net, "where_new")) == 12
    assert layers.num_output(_layer(net, "obj")) == 6 and layers.num_output(_layer(net, "anchor_boxes")) == 12
    assert "'num_classes': 3" in _layer(net, "input-data").python_param.param_str
    assert "'num_classes': 3" in _layer(net, "roi-data").python_param.param_str
    assert _layer(net, "loss_box").bottom[0] == "where_new"
    assert any(note.startswith("kept obj:") for note in result.notes)
    _again(result, 3)


def test_faster_rcnn_test_net_keeps_the_rpn_and_stays_a_deploy_net(fork):
    result = _rewrite("faster_like_test.prototxt", classes=4)
    assert [head.name for head in result.heads] == ["which", "where"] and list(result.outputs) == ["deploy"]
    net = _net(result, "deploy")
    assert layers.num_output(_layer(net, "where_new")) == 16 and layers.num_output(_layer(net, "obj")) == 6
    assert list(_layer(net, "obj_prob_reshape").reshape_param.shape.dim) == [0, 6, -1, 0]
    _again(result, 4, role="deploy")


def test_rpn_only_net_is_refused_as_class_agnostic(fork):
    text = (DATA / "faster_like_test.prototxt").read_text().split('layer {\n  name: "roi_pool"')[0]
    with pytest.raises(NetError) as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=4, name="new"))
    assert "class-agnostic objectness" in caught.value.what and "obj" in caught.value.what


def test_rpn_training_stage_is_refused_naming_the_count_no_layer_reads(fork):
    text = (DATA / "faster_like_train.prototxt").read_text().split("layer {\n  name: 'roi-data'")[0]
    with pytest.raises(NetError) as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=4, name="new"))
    assert "class-agnostic objectness score (obj)" in caught.value.what
    assert "input-data's 'num_classes': 5 sizes no layer" in caught.value.what


def test_class_agnostic_box_regression_stays(fork):
    text = (DATA / "faster_like_train.prototxt").read_text()
    text = text.replace("num_output: 20 weight_filler", "num_output: 8 weight_filler").replace(
        "ProposalTargetLayer' param_str: \"'num_classes': 5\"", "ProposalTargetLayer' param_str: \"'num_classes': 2\"")
    result = rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
    assert [head.name for head in result.heads] == ["which"]
    net = _net(result)
    assert layers.num_output(_layer(net, "where")) == 8
    assert "'num_classes': 2" in _layer(net, "roi-data").python_param.param_str
    assert "'num_classes': 3" in _layer(net, "input-data").python_param.param_str


def test_rfcn_position_sensitive_maps_and_output_dims(fork):
    result = _rewrite("rfcn_like_train.prototxt", classes=3)
    assert [head.name for head in result.heads] == ["maps_cls", "maps_box"]
    net = _net(result)
    assert layers.num_output(_layer(net, "maps_cls_new")) == 3 * 9
    assert layers.num_output(_layer(net, "maps_box_new")) == 4 * 3 * 9
    assert _layer(net, "ps_cls").psroi_pooling_param.output_dim == 3
    assert _layer(net, "ps_box").psroi_pooling_param.output_dim == 12
    _again(result, 3)


def test_rfcn_test_net_reshapes_after_the_class_layers_follow(fork):
    text = (DATA / "rfcn_like_train.prototxt").read_text().split('layer { name: "loss"')[0] + """
layer { name: "prob" type: "Softmax" bottom: "cls_score" top: "prob_pre" }
layer { name: "prob_reshape" type: "Reshape" bottom: "prob_pre" top: "cls_prob" reshape_param { shape { dim: -1 dim: 5 } } }
layer { name: "box_reshape" type: "Reshape" bottom: "bbox_pred" top: "boxes" reshape_param { shape { dim: -1 dim: 20 } } }
"""
    net = _net(rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new")))
    assert list(_layer(net, "prob_reshape").reshape_param.shape.dim) == [-1, 3]
    assert list(_layer(net, "box_reshape").reshape_param.shape.dim) == [-1, 12]


@pytest.mark.parametrize("edit, named", [
    (("num_output: 30   # 6 priors", "num_output: 31   # 6 priors"), "q_b"),               # does not divide
    (("num_classes: 5 share_location", "num_classes: 6 share_location"), "q_a"),             # 15 / 6
])
def test_inconsistent_counts_are_refused_naming_the_layer(fork, edit, named):
    text = (DATA / "ssd_like_train.prototxt").read_text().replace(*edit)
    with pytest.raises(NetError) as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
    assert caught.value.where == named and "nothing was rewritten" in caught.value.fix


def test_unknown_python_layer_holding_a_count_is_refused(fork):
    text = (DATA / "faster_like_train.prototxt").read_text().replace("module: 'roi_data_layer.layer' layer: "
                                                                     "'RoIDataLayer'", "module: 'my_data' layer: 'Mine'")
    with pytest.raises(NetError) as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
    assert caught.value.where == "input-data" and "my_data.Mine" in caught.value.what


def test_segnet_class_weighting_needs_class_weights(fork):
    with pytest.raises(NetError) as caught:
        _rewrite("segnet_like_train.prototxt", classes=3)
    assert caught.value.where == "loss" and "--class-weights" in caught.value.fix
    result = _rewrite("segnet_like_train.prototxt", classes=3, class_weights=(1.0, 2.0, 3.0))
    net = _net(result)
    assert [head.name for head in result.heads] == ["classes"]
    assert list(_layer(net, "loss").loss_param.class_weighting) == [1.0, 2.0, 3.0]
    assert layers.num_output(_layer(net, "classes_new")) == 3
    _again(result, 3, class_weights=(1.0, 2.0, 3.0))


def test_center_loss_centres_follow_a_classifier(fork):
    result = _rewrite("center_loss_train.prototxt", classes=4)
    assert [head.name for head in result.heads] == ["fc_id"]
    net = _net(result)
    assert _layer(net, "center_loss_new").center_loss_param.num_output == 4
    assert any("center_loss" in note and "10 -> 4" in note for note in result.notes)


def test_two_tasks_with_different_counts_are_refused_unless_one_is_chosen():
    with pytest.raises(NetError) as caught:
        _rewrite("two_task_fcn_train.prototxt")
    assert "5 classes" in caught.value.what and "3 classes" in caught.value.what and "--head" in caught.value.fix
    result = _rewrite("two_task_fcn_train.prototxt", classes=7, heads=("geo",))
    assert [head.name for head in result.heads] == ["geo", "geo_up"]
    net = _net(result)
    assert layers.num_output(_layer(net, "coarse")) == 5 and layers.num_output(_layer(net, "geo_up_new")) == 7
    assert layers.param_message(_layer(net, "geo_up_new")).group == 7


def test_fcn_analysis_finds_every_score_and_upsampling_layer():
    net = prototxt.parse((DATA / "fcn_like_train.prototxt").read_text())
    analysis = class_layers.analyze(net)
    assert analysis.task == "segmentation" and analysis.count == 5 and analysis.background is None
    assert [(entry.name, entry.fixed) for entry in analysis.layers] == [
        ("coarse", False), ("up_a", True), ("fine", False), ("up_b", True)]


def test_plain_classifier_is_not_a_dense_net():
    net = prototxt.parse('layer { name: "d" type: "Input" top: "data" top: "label" '
                         'input_param { shape { dim: 1 dim: 4 } shape { dim: 1 } } } '
                         'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                         'inner_product_param { num_output: 3 } } '
                         'layer { name: "l" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "l" }')
    assert class_layers.analyze(net) is None


@pytest.mark.parametrize("case, role", [("ssd_like_train", "train_val"), ("faster_like_train", "train_val"),
                                        ("fcn_like_deploy", "deploy"), ("refinedet_like_train", "train_val"),
                                        ("deeplab_like_train", "train_val")])
def test_golden(fork, case, role):
    result = _rewrite(f"{case}.prototxt", classes=3)
    expected = GOLDEN / f"{case}.prototxt"
    text = result.outputs[role].text
    if os.environ.get("CAFFETUNE_UPDATE_GOLDEN"):
        expected.parent.mkdir(parents=True, exist_ok=True)
        expected.write_text(text)
    assert expected.is_file(), f"missing golden file {expected}; run with CAFFETUNE_UPDATE_GOLDEN=1"
    assert text == expected.read_text()
    prototxt.parse(text)
    _again(result, 3, role=role)


def test_cli_json_lists_every_class_layer_and_a_deploy_net_writes_one_file(fork, tmp_path):
    from caffetune.cli import cli

    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(cli, ["--proto", str(fork), "rewrite", str(DATA / "ssd_like_deploy.prototxt"),
                                 "--classes", "3", "--name", "x", "-o", str(tmp_path / "out.prototxt"), "--json"])
    assert result.exit_code == 0, result.stderr
    assert [head["name"] for head in json.loads(result.stdout)["heads"]] == ["q_a"]
    assert "q_a_x" in (tmp_path / "out.prototxt").read_text()


def test_inspect_and_draw_mark_the_class_dependent_layers(fork):
    from caffetune.report import draw, inspection

    report = inspection.inspect_net(DATA / "faster_like_train.prototxt", use_pycaffe=False)
    assert report.heads == ["which", "where"] and "detection net, 5 classes" in report.head_note
    assert {row.name for row in report.layers if row.head} == {"which", "where"}
    source = draw.build_graph(prototxt.parse((DATA / "ssd_like_train.prototxt").read_text())).source
    nodes = re.findall(r'layer\d+ \[label="([^"]*)"([^\]]*)\]', source)
    assert sorted(label.split("\n")[0] for label, attrs in nodes if "peripheries=2" in attrs) == ["q_a", "q_b"]


def test_cli_class_weights_replace_a_per_class_list(fork, tmp_path):
    from caffetune.cli import cli

    runner = CliRunner(mix_stderr=False)
    args = ["--proto", str(fork), "rewrite", str(DATA / "segnet_like_train.prototxt"), "--classes", "2",
            "--name", "x", "-o", str(tmp_path / "out.prototxt")]
    refused = runner.invoke(cli, args)
    assert refused.exit_code != 0 and "--class-weights" in refused.stderr + str(refused.exception)
    done = runner.invoke(cli, args + ["--class-weights", "1,3"])
    assert done.exit_code == 0, done.stderr
    net = prototxt.parse((tmp_path / "out.prototxt").read_text())
    assert list(_layer(net, "loss").loss_param.class_weighting) == [1.0, 3.0]


def test_a_sigmoid_gate_in_the_backbone_is_not_a_class_output(fork):
    gate = """
layer { name: "squeeze" type: "InnerProduct" bottom: "body1" top: "squeeze" inner_product_param { num_output: 8 } }
layer { name: "gate" type: "Sigmoid" bottom: "squeeze" top: "gate" }
layer { name: "excite" type: "Scale" bottom: "body1" bottom: "gate" top: "body1_se" scale_param { axis: 0 } }
"""
    text = (DATA / "ssd_like_train.prototxt").read_text().replace('layer {\n  name: "body2"', gate + 'layer {\n  name: "body2"', 1)
    result = rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
    assert [head.name for head in result.heads] == ["q_a", "q_b"]


def test_refinedet_anchor_refinement_stays_and_only_the_class_branch_follows(fork):
    result = _rewrite("refinedet_like_train.prototxt", classes=3)
    assert [head.name for head in result.heads] == ["t_conf"]
    net = _net(result)
    assert layers.num_output(_layer(net, "t_conf_new")) == 3 * 3 and layers.num_output(_layer(net, "r_conf")) == 6
    assert _layer(net, "refine_loss").multibox_loss_param.num_classes == 2
    assert _layer(net, "loss").multibox_loss_param.num_classes == 3
    assert list(_layer(net, "r_conf_reshape").reshape_param.shape.dim) == [0, -1, 2]
    assert any(note.startswith("kept r_conf: class-agnostic objectness") for note in result.notes)
    _again(result, 3)


def test_refinedet_deploy_keeps_the_refinement_scores_the_detection_layer_reads(fork):
    text = (DATA / "refinedet_like_train.prototxt").read_text()
    refine_loss = text[text.index('layer {\n  name: "refine_loss"'):text.index('layer { name: "r_conf_reshape"')]
    text = text[:text.index('layer {\n  name: "loss"')].replace(refine_loss, "") + """
layer {
  name: "out"
  type: "DetectionOutput"
  bottom: "t_loc_flat"
  bottom: "t_conf_flat"
  bottom: "prior"
  bottom: "r_prob"
  bottom: "r_loc_flat"
  top: "out"
  detection_output_param { num_classes: 5 share_location: true background_label_id: 0 }
}
"""
    result = rewrite.rewrite_text(text, rewrite.Options(classes=4, name="new"))
    assert [head.name for head in result.heads] == ["t_conf"]
    net = _net(result, "deploy")
    assert layers.num_output(_layer(net, "t_conf_new")) == 12 and layers.num_output(_layer(net, "r_conf")) == 6
    assert _layer(net, "out").detection_output_param.num_classes == 4
    _again(result, 4, role="deploy")


def test_labels_shrunk_by_interp_make_a_segmentation_net(fork):
    net = prototxt.parse((DATA / "deeplab_like_train.prototxt").read_text())
    analysis = class_layers.analyze(net)
    assert analysis.task == "segmentation" and analysis.count == 5
    assert [entry.name for entry in analysis.layers] == ["rate2", "rate4"]
    result = _rewrite("deeplab_like_train.prototxt", classes=3)
    assert list(result.outputs) == ["train_val"]
    assert any("not derived for a segmentation net" in note for note in result.notes)
    assert layers.num_output(_layer(_net(result), "rate4_new")) == 3
    _again(result, 3)


def test_a_two_way_text_proposal_net_is_refused_as_class_agnostic():
    text = """
layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "f" type: "Convolution" bottom: "data" top: "f" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "s" type: "Convolution" bottom: "f" top: "s" convolution_param { num_output: 20 kernel_size: 1 } }
layer { name: "b" type: "Convolution" bottom: "f" top: "b" convolution_param { num_output: 20 kernel_size: 1 } }
layer { name: "s_r" type: "Reshape" bottom: "s" top: "s_r" reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "p" type: "Softmax" bottom: "s_r" top: "p" }
"""
    with pytest.raises(NetError) as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=4, name="new"))
    assert "class-agnostic objectness" in caught.value.what and "(s)" in caught.value.what


def test_a_layer_holding_a_count_in_its_own_layout_is_refused(fork):
    text = """
layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "f" type: "Convolution" bottom: "data" top: "f" convolution_param { num_output: 125 kernel_size: 3 } }
layer { name: "region" type: "Region" bottom: "f" top: "region" region_param { classes: 20 coords: 4 num: 5 } }
"""
    with pytest.raises(NetError) as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=4, name="new"))
    assert caught.value.where == "region" and "region_param.classes: 20" in caught.value.what


@pytest.mark.parametrize("params, refused", [("proposal_target_param { num_classes: 5 }", False), ("", True)])
def test_a_fork_layer_count_follows_or_its_default_is_refused(fork, params, refused):
    text = (DATA / "faster_like_train.prototxt").read_text().replace(
        "type: 'Python'\n  bottom: 'rpn_rois'", "type: 'ProposalTarget'\n  bottom: 'rpn_rois'").replace(
        "python_param { module: 'rpn.proposal_target_layer' layer: 'ProposalTargetLayer' param_str: \"'num_classes': 5\" }",
        params)
    if refused:
        with pytest.raises(NetError) as caught:
            rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
        assert caught.value.where == "roi-data" and "schema's default" in caught.value.what
        return
    result = rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
    assert _layer(_net(result), "roi-data").proposal_target_param.num_classes == 3
    _again(result, 3)


def test_a_void_label_numbered_after_the_classes_is_kept_with_a_note(fork):
    result = _rewrite("segnet_like_train.prototxt", classes=3, class_weights=(1.0, 2.0, 3.0))
    assert _layer(_net(result), "loss").loss_param.ignore_label == 4
    assert any(note.startswith("kept loss: loss_param.ignore_label 4") for note in result.notes)


def test_upsampled_scores_written_out_by_a_sink_layer_are_class_maps(fork):
    text = (DATA / "deeplab_like_train.prototxt").read_text().split('layer { name: "label_shrink"')[0] + """
layer { name: "zoom" type: "Interp" bottom: "fused" top: "zoom" interp_param { zoom_factor: 2 } }
layer { name: "save" type: "HDF5Output" bottom: "zoom" bottom: "label" hdf5_output_param { file_name: "out.h5" } }
"""
    result = rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new"))
    assert [head.name for head in result.heads] == ["rate2", "rate4"] and list(result.outputs) == ["deploy"]
    assert layers.num_output(_layer(_net(result, "deploy"), "rate2_new")) == 3
    _again(result, 3, role="deploy")
