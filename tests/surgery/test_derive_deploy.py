"""Deriving deploy nets. Under fork schemas that predate the Input layer (py-faster-rcnn's, TSN's caffe.proto) the
deploy input is written as `input:` + `input_shape` (or `input_dim` where even that is missing), never a traceback;
the output Softmax never clashes with a blob the net already has."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffetune.model import heads, layers, prototxt, schema
from caffetune.surgery import derive, rewrite

DATA = Path(__file__).resolve().parent.parent / "data" / "rewrite"


def fork_proto(caffe_source: Path, folder: Path, *dropped: str) -> schema.Schema:
    """The pinned caffe.proto without the given field declarations: an older fork's schema."""
    text = (caffe_source / "src/caffe/proto/caffe.proto").read_text()
    for declaration in dropped:
        assert declaration in text
        text = text.replace(declaration, "")
    path = folder / "caffe.proto"
    path.write_text(text)
    return schema.load_from_proto(path)


@pytest.fixture
def no_input_layer(caffe_source, tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFETUNE_CACHE", str(tmp_path / "cache"))
    fork = fork_proto(caffe_source, tmp_path, "optional InputParameter input_param = 143;")
    monkeypatch.setattr(schema, "_current", fork)
    return fork


def test_deploy_input_falls_back_to_input_shape(no_input_layer):
    net = prototxt.parse((DATA / "cifar_sigmoid_bn.prototxt").read_text())
    assert "input_param" not in net.layer[0].DESCRIPTOR.fields_by_name
    deploy = derive.deploy_from_train_val(net, heads.find_heads(net))
    assert list(deploy.input) == ["data"] and list(deploy.input_shape[0].dim) == [1, 3, 8, 8]
    assert not deploy.input_dim and "Input" not in [layers.type_name(layer) for layer in deploy.layer]


def test_deploy_input_falls_back_to_input_dim_without_input_shape(caffe_source, tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFETUNE_CACHE", str(tmp_path / "cache"))
    fork = fork_proto(caffe_source, tmp_path, "optional InputParameter input_param = 143;",
                      "repeated BlobShape input_shape = 8;")
    net = prototxt.parse((DATA / "cifar_sigmoid_bn.prototxt").read_text(), proto=fork)
    deploy = derive.deploy_from_train_val(net, heads.find_heads(net))
    assert list(deploy.input) == ["data"] and list(deploy.input_dim) == [1, 3, 8, 8]
    assert derive.input_shape(deploy) == ("data", [1, 3, 8, 8])


def test_rewrite_round_trip_under_the_fork_is_stable(no_input_layer):
    """deploy -> train_val -> (second rewrite) deploy again: the path that raised AttributeError: input_param."""
    text = (DATA / "densenet_tail_deploy.prototxt").read_text()
    options = rewrite.Options(classes=3, name="ft")
    first = rewrite.rewrite_text(text, options)
    train_val = first.outputs["train_val"].text
    second = rewrite.rewrite_text(train_val, options)
    assert second.outputs["train_val"].text == train_val
    deploy = prototxt.parse(second.outputs["deploy"].text)
    assert list(deploy.input) == ["data"] and list(deploy.input_shape[0].dim) == [1, 3, 8, 8]
    assert [head.name for head in heads.find_heads(deploy)] == ["fc6_ft"]


def test_the_deploy_softmax_never_clashes_with_an_existing_prob():
    """A train_val whose `prob` blob is something else (here an auxiliary Softmax) gets `prob_1` for its scores."""
    text = (DATA / "two_stream_train_val.prototxt").read_text().replace(
        '# late fusion', 'layer { name: "prob" type: "Softmax" bottom: "fc8_rgb" top: "prob" }\n# late fusion').replace(
        'data_param { source: "val_lmdb"', 'transform_param { crop_size: 8 } data_param { source: "val_lmdb"')
    net = prototxt.parse(text)
    deploy = derive.deploy_from_train_val(net, heads.find_heads(net, names=["fc8_rgb", "fc8_flow"]))
    assert [(layer.name, list(layer.bottom)) for layer in deploy.layer][-1] == ("prob_1", ["fusion"])
