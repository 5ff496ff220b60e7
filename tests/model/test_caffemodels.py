"""Reading caffemodels layer by layer (V2, V1 with legacy 4-D blobs), checked against the real pycaffe."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caffetune.errors import PrototxtError
from caffetune.model import caffemodels, schema

from helpers import run_pycaffe, save_random_weights

NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 }
                        bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""

DUMP_PARAMS = """
    import sys, json, caffe
    import numpy as np
    net = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
    arrays = {f"{name}/{i}": blob.data for name, blobs in net.params.items() for i, blob in enumerate(blobs)}
    np.savez(sys.argv[3], **arrays)
    print(json.dumps({name: [list(b.data.shape) for b in blobs] for name, blobs in net.params.items()}))
"""


@pytest.fixture(scope="module")
def tiny(caffe_install, tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    net = folder / "tiny.prototxt"
    net.write_text(NET)
    model = save_random_weights(caffe_install, net, folder / "tiny.caffemodel")
    return net, model


def pycaffe_params(install, net, model, npz):
    result = run_pycaffe(install, DUMP_PARAMS, str(net), str(model), str(npz))
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(npz)


def test_layer_shapes_match_what_pycaffe_loads(caffe_install, tiny, tmp_path):
    net, model = tiny
    shapes, _ = pycaffe_params(caffe_install, net, model, tmp_path / "p.npz")
    found = caffemodels.layer_shapes(model)
    assert {name: [list(s) for s in blobs] for name, blobs in found.items() if blobs} == shapes
    assert found["relu1"] == [] and found["prob"] == []  # net.save writes every layer, blobs or not
    assert list(found) == ["data", "conv1", "relu1", "fc", "prob"]


def test_blob_arrays_are_the_values_pycaffe_reads(caffe_install, tiny, tmp_path):
    net, model = tiny
    _, arrays = pycaffe_params(caffe_install, net, model, tmp_path / "p.npz")
    with caffemodels.Caffemodel(model) as opened:
        records = {r.name: r for r in opened.layers()}
        for key in arrays.files:
            name, index = key.split("/")
            blob = records[name].blobs[int(index)]
            assert opened.array(blob, copy=True).tobytes() == arrays[key].tobytes(), key
        assert opened.name == "tiny"
        assert opened.layer_message(records["fc"]).inner_product_param.num_output == 5


def write_v1_model(path, arrays: dict[str, list[np.ndarray]]):
    """A V1 (`layers`) caffemodel with legacy num/channels/height/width blobs, as 2014-era Caffe wrote them."""
    net = schema.current().NetParameter(name="tiny")
    kinds = {"conv1": "CONVOLUTION", "fc": "INNER_PRODUCT"}
    enum = net.DESCRIPTOR.fields_by_name["layers"].message_type.fields_by_name["type"].enum_type
    for name, blobs in arrays.items():
        layer = net.layers.add(name=name, type=enum.values_by_name[kinds[name]].number)
        for array in blobs:
            blob = layer.blobs.add()
            legacy = (1,) * (4 - array.ndim) + array.shape
            blob.num, blob.channels, blob.height, blob.width = legacy
            blob.data.extend(array.ravel().tolist())
    path.write_bytes(net.SerializeToString())
    return path


def test_v1_caffemodel_with_legacy_blobs_is_read_and_caffe_agrees(caffe_install, tiny, tmp_path):
    net, _ = tiny
    rng = np.random.default_rng(1)
    arrays = {"conv1": [rng.normal(size=(4, 3, 3, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
              "fc": [rng.normal(size=(5, 144)).astype(np.float32), rng.normal(size=5).astype(np.float32)]}
    model = write_v1_model(tmp_path / "v1.caffemodel", arrays)
    assert caffemodels.layer_shapes(model) == {"conv1": [(4, 3, 3, 3), (1, 1, 1, 4)], "fc": [(1, 1, 5, 144), (1, 1, 1, 5)]}
    records = caffemodels.read_layers(model)
    assert [(r.name, r.type, r.format) for r in records] == [("conv1", "Convolution", "V1"),
                                                              ("fc", "InnerProduct", "V1")]
    _, loaded = pycaffe_params(caffe_install, net, model, tmp_path / "p.npz")  # Caffe upgrades and copies them
    with caffemodels.Caffemodel(model) as opened:
        for record in opened.layers():
            for i, blob in enumerate(record.blobs):
                assert blob.legacy
                assert opened.array(blob).ravel().tobytes() == loaded[f"{record.name}/{i}"].ravel().tobytes()


@pytest.mark.parametrize("content", [b'name: "tiny"\nlayer { name: "x" }\n', b"", b"\x89HDF\r\n\x1a\n" + bytes(64),
                                     b"\xff\xff\xff\xff"])
def test_a_file_that_is_not_a_caffemodel_is_refused_with_its_path(tmp_path, content):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(content)
    with pytest.raises(PrototxtError) as caught:
        caffemodels.layer_shapes(path)
    assert caught.value.where == str(path)
    assert caught.value.fix


def test_a_mean_binaryproto_is_not_taken_for_a_caffemodel(tmp_path):
    blob = schema.current().BlobProto(num=1, channels=3, height=2, width=2)
    blob.data.extend([1.0] * 12)
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(blob.SerializeToString())
    with pytest.raises(PrototxtError, match="not a caffemodel"):
        caffemodels.layer_shapes(path)


def test_missing_file(tmp_path):
    with pytest.raises(PrototxtError, match="file not found"):
        caffemodels.layer_shapes(tmp_path / "nope.caffemodel")


def test_encoded_blob_parses_through_the_schema():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    blob = schema.current().BlobProto()
    blob.ParseFromString(caffemodels.encode_blob(array))
    assert list(blob.shape.dim) == [2, 3, 4]
    assert np.asarray(blob.data, np.float32).tobytes() == array.tobytes()


def test_varints_round_trip_including_negative_numbers():
    for value in (0, 1, 127, 128, 300, 2**31, 2**63 - 1, -1, -5):
        encoded = caffemodels.encode_varint(value)
        decoded, end = caffemodels.read_varint(encoded, 0, len(encoded))
        assert caffemodels.signed64(decoded) == value and end == len(encoded)


def test_legacy_shapes_match_like_blob_shape_equals():
    legacy = caffemodels.BlobRef((1, 1, 1, 1000), True, "float32", 0, 1000, (0, 0))
    modern = caffemodels.BlobRef((1000,), False, "float32", 0, 1000, (0, 0))
    assert caffemodels.shape_matches(legacy, (1000,)) and caffemodels.shape_matches(legacy, (1, 1000))
    assert not caffemodels.shape_matches(legacy, (1000, 1))
    assert caffemodels.shape_matches(modern, (1000,)) and not caffemodels.shape_matches(modern, (1, 1000))


def test_v0_weights_nested_in_v1_entries_are_read(tmp_path):
    """The oldest caffemodels (2013) keep each layer as `layers { layer { name type blobs } }`."""
    net = schema.current().NetParameter(name="v0")
    old = net.layers.add().layer
    old.name, old.type = "conv1", "conv"
    blob = old.blobs.add()
    blob.num, blob.channels, blob.height, blob.width = 2, 3, 1, 1
    blob.data.extend([1, 2, 3, 4, 5, 6])
    path = tmp_path / "v0.caffemodel"
    path.write_bytes(net.SerializeToString())
    (record,) = caffemodels.read_layers(path)
    assert (record.name, record.type, record.format, record.shapes) == ("conv1", "conv", "V0", [(2, 3, 1, 1)])
    with caffemodels.Caffemodel(path) as opened:
        assert opened.array(record.blobs[0]).ravel().tolist() == [1, 2, 3, 4, 5, 6]
