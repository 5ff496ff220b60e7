"""A train net whose data layers declare their shape (DummyData, as benchmark and smoke-test nets use; MemoryData;
Input) gets its deploy net from that shape, which then builds in real Caffe with the new class count."""
from __future__ import annotations

from pathlib import Path

import pytest

from caffetune.model import heads, prototxt
from caffetune.surgery import derive

from helpers import run_pycaffe

BODY = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc8" type: "InnerProduct" bottom: "conv1" top: "fc8" inner_product_param { num_output: 7 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }
"""
DUMMY = """
layer { name: "data" type: "DummyData" top: "data" include { phase: TRAIN }
        dummy_data_param { shape { dim: 4 dim: 3 dim: 16 dim: 16 } data_filler { type: "constant" value: 0.01 } } }
layer { name: "label" type: "DummyData" top: "label" include { phase: TRAIN } dummy_data_param { shape { dim: 4 } } }
"""
LEGACY_DUMMY = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { num: 4 channels: 3 height: 16 width: 16 num: 4 channels: 1 height: 1 width: 1 } }
"""
MEMORY = """
layer { name: "data" type: "MemoryData" top: "data" top: "label"
        memory_data_param { batch_size: 4 channels: 3 height: 16 width: 16 } }
"""


@pytest.mark.parametrize("data", [DUMMY, LEGACY_DUMMY, MEMORY], ids=["dummy", "dummy-legacy", "memory"])
def test_deploy_input_comes_from_the_declared_shape(data):
    net = prototxt.parse(data + BODY)
    deploy = derive.deploy_from_train_val(net, heads.find_heads(net))
    source = deploy.layer[0]
    assert source.type == "Input" and list(source.input_param.shape[0].dim) == [1, 3, 16, 16]
    assert [layer.name for layer in deploy.layer][-1] == "prob"


def test_the_derived_deploy_builds_in_caffe(caffe_install, tmp_path):
    net = prototxt.parse(DUMMY + BODY)
    path = tmp_path / "deploy.prototxt"
    path.write_text(prototxt.format(derive.deploy_from_train_val(net, heads.find_heads(net))))
    done = run_pycaffe(caffe_install, """
        import sys, caffe
        net = caffe.Net(sys.argv[1], caffe.TEST)
        print(net.blobs["prob"].data.shape)
    """, str(path))
    assert done.stdout.strip() == "(1, 7)"


VIDEO_FIELDS = """
message VideoDataParameter {
  optional string source = 1;
  optional uint32 batch_size = 4;
  optional uint32 new_length = 11 [default = 1];
  optional uint32 num_segments = 12 [default = 1];
  enum Modality {
    RGB = 0;
    FLOW = 1;
  }
  optional Modality modality = 13 [default = FLOW];
}
"""
TSN_FLOW = """
layer { name: "data" type: "VideoData" top: "data" top: "label" include { phase: TEST }
        video_data_param { source: "val.txt" batch_size: 1 new_length: 5 num_segments: 3 modality: %s }
        transform_param { crop_size: 16 mean_value: %s } }
layer { name: "data_reshape" type: "Reshape" bottom: "data" top: "data_reshape"
        reshape_param { shape { dim: [-1, %d, 16, 16] } } }
layer { name: "conv1" type: "Convolution" bottom: "data_reshape" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 7 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.fixture
def video_schema(tmp_path):
    """The pinned caffe.proto plus a temporal-segment-network fork's VideoData parameters."""
    from caffetune._generated import caffe_schema
    from caffetune.model import schema

    text = Path(caffe_schema.SOURCE).read_text().replace(
        "message LayerParameter {", "message LayerParameter {\n  optional VideoDataParameter video_data_param = 9137;", 1)
    path = tmp_path / "caffe.proto"
    path.write_text(text + VIDEO_FIELDS)
    schema.use(path)
    yield path
    schema.use(None)


@pytest.mark.parametrize("modality, mean, channels", [("FLOW", "128", 10), ("RGB", "[104, 117, 123]", 15)])
def test_video_data_stacks_frames_along_channels(video_schema, modality, mean, channels):
    """TSN's flow nets stack 5 (x, y) flow frames: a 10-channel input, which their data_reshape expects."""
    net = prototxt.parse(TSN_FLOW % (modality, mean, channels))
    deploy = derive.deploy_from_train_val(net, heads.find_heads(net))
    assert list(deploy.layer[0].input_param.shape[0].dim) == [1, channels, 16, 16]
