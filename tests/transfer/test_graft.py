"""`caffetune graft` against the real Caffe: bit-identical copies, kept class rows, `caffe train -weights`,
and the copy/ignore decisions Caffe's own log reports."""
from __future__ import annotations

import json
import re
import subprocess
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.errors import NetError
from caffetune.model import caffemodels, prototxt, shapes
from caffetune.transfer import fillers, graft

from helpers import caffe_train, run_pycaffe, save_random_weights, write_tiny_lmdb

BODY = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" }
                      bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "{head}" type: "InnerProduct" bottom: "pool1" top: "{head}"
  inner_product_param { num_output: {classes} weight_filler { type: "gaussian" std: 0.1 }
                        bias_filler { type: "constant" value: 0.5 } } }
"""
SOURCE_NET = ('name: "source"\nlayer { name: "data" type: "Input" top: "data" '
              'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
              + BODY.replace("{head}", "fc").replace("{classes}", "5")
              + 'layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }\n')


def new_net(head: str, classes: int, *, db: str | None = None) -> str:
    """The fine-tuning net: a TRAIN-only Data layer (one net, so Caffe's log has one copy pass) or an Input."""
    if db:
        data = (f'layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }} '
                f'data_param {{ source: "{db}" backend: LMDB batch_size: 4 }} }}\n')
        tail = f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "{head}" bottom: "label" top: "loss" }}\n'
    else:
        data = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
        tail = f'layer {{ name: "prob" type: "Softmax" bottom: "{head}" top: "prob" }}\n'
    return 'name: "new"\n' + data + BODY.replace("{head}", head).replace("{classes}", str(classes)) + tail


@pytest.fixture(scope="module")
def source(caffe_install, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graft")
    net = folder / "source.prototxt"
    net.write_text(SOURCE_NET)
    model = save_random_weights(caffe_install, net, folder / "source.caffemodel")
    # BatchNorm starts at zeros; give it statistics so that the copy is visible.
    run_pycaffe(caffe_install, """
        import sys, caffe, numpy as np
        net = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
        rng = np.random.default_rng(3)
        for blob in net.params["bn1"]:
            blob.data[...] = rng.uniform(0.5, 2, blob.data.shape)
        net.save(sys.argv[2])
    """, str(net), str(model))
    return model


DUMP = """
    import sys, caffe, numpy as np
    net = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
    np.savez(sys.argv[3], **{f"{n}/{i}": b.data for n, bs in net.params.items() for i, b in enumerate(bs)})
"""


def loaded_params(install, net_path, model, npz):
    run_pycaffe(install, DUMP, str(net_path), str(model), str(npz))
    return np.load(npz)


def source_arrays(model) -> dict[str, np.ndarray]:
    with caffemodels.Caffemodel(model) as opened:
        return {f"{r.name}/{i}": opened.array(b, copy=True) for r in opened.layers() for i, b in enumerate(r.blobs)}


def test_graft_copies_bit_identical_blobs_and_keeps_class_rows(caffe_install, source, tmp_path):
    net = tmp_path / "deploy.prototxt"
    net.write_text(new_net("fc_new", 3))
    out = tmp_path / "grafted.caffemodel"
    result = CliRunner().invoke(cli, ["graft", "--from", str(source), "--net", str(net), "-o", str(out),
                                      "--map", "fc=fc_new", "--keep-classes", "4:0,1:2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["copied"] == ["conv1", "bn1", "scale1"] and report["partial"] == ["fc_new"]
    assert report["unused"] == []  # fc went into fc_new; the new net has its own prob
    loaded = loaded_params(caffe_install, net, out, tmp_path / "p.npz")
    original = source_arrays(source)
    for key in ("conv1/0", "conv1/1", "bn1/0", "bn1/1", "bn1/2", "scale1/0", "scale1/1"):
        assert loaded[key].tobytes() == original[key].tobytes(), key
    weight, bias = loaded["fc_new/0"], loaded["fc_new/1"]
    assert weight.shape == (3, 36)
    assert weight[0].tobytes() == original["fc/0"][4].tobytes() and bias[0] == original["fc/1"][4]
    assert weight[2].tobytes() == original["fc/0"][1].tobytes() and bias[2] == original["fc/1"][1]
    assert bias[1] == 0.5  # the new class starts from the layer's bias_filler
    assert not any(np.array_equal(weight[1], row) for row in original["fc/0"])


def test_caffe_train_runs_from_the_grafted_weights(caffe_install, source, tmp_path):
    db = write_tiny_lmdb(tmp_path / "lmdb", count=16, height=8, width=8, classes=3)
    net = tmp_path / "train.prototxt"
    net.write_text(new_net("fc_new", 3, db=str(db)))
    out = tmp_path / "grafted.caffemodel"
    report = graft.graft(source, net, out, mapping={"fc_new": "fc"}, keep=[(0, 0), (2, 1)])
    assert report.plan.names("partial") == ["fc_new"]
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01 lr_policy: "fixed" max_iter: 3 display: 1\n'
                      f'snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU\n')
    result = caffe_train(caffe_install, solver, f"-weights={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done." in result.stderr
    assert "Ignoring source layer" not in result.stderr  # every layer of the grafted file is in the net


def ignored_by_caffe(log: str) -> list[str]:
    return re.findall(r"Ignoring source layer (\S+)", log)


def test_inspect_predicts_what_caffe_copies_and_ignores(caffe_install, source, tmp_path):
    db = write_tiny_lmdb(tmp_path / "lmdb", count=16, classes=3)
    net = tmp_path / "train.prototxt"
    net.write_text(new_net("fc_new", 3, db=str(db)))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01 lr_policy: "fixed" max_iter: 1\n'
                      f'snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU\n')
    result = CliRunner().invoke(cli, ["inspect", str(net), "--weights", str(source), "--json", "--no-pycaffe"])
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.output)["weights"]
    log = caffe_train(caffe_install, solver, f"-weights={source}").stderr
    assert "Optimization Done." in log
    assert sorted(ignored_by_caffe(log)) == sorted(predicted["unused"]) == ["fc", "prob"]
    assert predicted["copied"] == ["conv1", "bn1", "scale1"] and predicted["scratch"] == ["fc_new"]


def test_inspect_predicts_the_shape_mismatch_that_aborts_caffe_and_graft_repairs_it(caffe_install, source, tmp_path):
    db = write_tiny_lmdb(tmp_path / "lmdb", count=16, classes=3)
    net = tmp_path / "train.prototxt"
    net.write_text(new_net("fc", 3, db=str(db)))  # the head kept its name but has 3 classes now
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01 lr_policy: "fixed" max_iter: 2\n'
                      f'snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU\n')
    result = CliRunner().invoke(cli, ["inspect", str(net), "--weights", str(source), "--json"])
    mismatched = json.loads(result.output)["weights"]["mismatched"]
    assert list(mismatched) == ["fc"] and "(5, 36)" in mismatched["fc"] and "(3, 36)" in mismatched["fc"]
    log = caffe_train(caffe_install, solver, f"-weights={source}")
    assert log.returncode != 0 and "Cannot copy param 0 weights from layer 'fc'; shape mismatch" in log.stderr
    out = tmp_path / "grafted.caffemodel"
    report = graft.graft(source, net, out)
    assert report.left_to_caffe == ["fc"] and "fc" not in report.written_layers
    fixed = caffe_train(caffe_install, solver, f"-weights={out}")
    assert fixed.returncode == 0, fixed.stderr[-3000:]


def test_fill_writes_every_layer_with_caffes_fillers(caffe_install, source, tmp_path):
    net = tmp_path / "deploy.prototxt"
    net.write_text(new_net("fc_new", 3))
    out = tmp_path / "filled.caffemodel"
    report = graft.graft(source, net, out, fill_new=True, seed=1)
    assert report.written_layers == ["conv1", "bn1", "scale1", "fc_new"] and report.left_to_caffe == []
    loaded = loaded_params(caffe_install, net, out, tmp_path / "p.npz")
    assert np.all(loaded["fc_new/1"] == 0.5)
    assert 0.05 < loaded["fc_new/0"].std() < 0.15  # gaussian std 0.1
    assert caffemodels.layer_shapes(out)["fc_new"] == [(3, 36), (3,)]


def test_graft_refuses_to_overwrite_and_checks_map_names(source, tmp_path):
    net = tmp_path / "deploy.prototxt"
    net.write_text(new_net("fc_new", 3))
    existing = tmp_path / "exists.caffemodel"
    existing.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["graft", "--from", str(source), "--net", str(net), "-o", str(existing)])
    assert result.exit_code != 0 and "--overwrite" in str(result.exception)
    with pytest.raises(NetError, match="no layer fc9"):
        graft.graft(source, net, tmp_path / "o.caffemodel", mapping={"fc_new": "fc9"})
    with pytest.raises(NetError, match="applies to no layer"):
        graft.graft(source, net, tmp_path / "o.caffemodel", keep=[(0, 0)])
    with pytest.raises(NetError, match="out of range"):
        graft.graft(source, net, tmp_path / "o.caffemodel", mapping={"fc_new": "fc"}, keep=[(7, 0)])
    assert not (tmp_path / "o.caffemodel").exists()


def test_option_parsing():
    assert graft.parse_map(["fc8=fc8_flickr"]) == {"fc8_flickr": "fc8"}
    assert graft.parse_keep_classes("281:0, 285:1") == [(281, 0), (285, 1)]
    for bad in ("281-0", "a:1", "1:2,3:2"):
        with pytest.raises(NetError):
            graft.parse_keep_classes(bad)
    with pytest.raises(NetError):
        graft.parse_map(["fc8"])


def test_labels_files_give_the_kept_classes(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("n01 tench, Tinca tinca\nn02 goldfish\nn03 great white shark\n")
    new = tmp_path / "new.txt"
    new.write_text("great white shark\nzebra\nn01\n")
    assert graft.keep_classes_from_labels(old, new) == [(0, 2)]  # "n01" matches the synset id of line 0
    new.write_text("n03 great white shark\nzebra\nn01\n")
    assert graft.keep_classes_from_labels(old, new) == [(2, 0), (0, 2)]


def test_fillers_follow_caffe():
    rng = np.random.default_rng(0)
    filler = prototxt.parse('weight_filler { type: "xavier" }', "InnerProductParameter").weight_filler
    values = fillers.fill((100, 300), filler, rng)
    assert np.abs(values).max() <= np.sqrt(3 / 300) and values.dtype == np.float32
    msra = prototxt.parse('weight_filler { type: "msra" variance_norm: FAN_OUT }', "InnerProductParameter")
    assert abs(fillers.fill((400, 100), msra.weight_filler, rng).std() - np.sqrt(2 / 400)) < 0.005
    constant = prototxt.parse('bias_filler { value: 0.2 }', "InnerProductParameter").bias_filler
    assert np.all(fillers.fill((3,), constant, rng) == np.float32(0.2))


def test_plan_matches_legacy_blobs_and_unknown_dimensions():
    net = prototxt.parse(textwrap.dedent("""
        layer { name: "data" type: "Data" top: "data" data_param { source: "/nonexistent" backend: LMDB batch_size: 2 } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
    """))
    inferred = shapes.infer(net)
    assert inferred.params["conv1"] == [(4, None, 3, 3), (4,)]
    record = caffemodels.LayerRecord(0, "conv1", "Convolution", "V1", [
        caffemodels.BlobRef((4, 3, 3, 3), True, "float32", 0, 108, (0, 0)),
        caffemodels.BlobRef((1, 1, 1, 4), True, "float32", 0, 4, (0, 0))])
    the_plan = graft.plan([record], net, inferred)
    assert the_plan.names("copied") == ["conv1"] and the_plan.unused == []


RESIDUAL = """
name: "residual"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
{branch}
layer { name: "{head}" type: "InnerProduct" bottom: "{feature}" top: "{head}"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "prob" type: "Softmax" bottom: "{head}" top: "prob" }
"""
BRANCH = """
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "conv1" bottom: "conv2" top: "sum" }
"""


def residual(head: str, branch: bool) -> str:
    return (RESIDUAL.replace("{branch}", BRANCH if branch else "").replace("{head}", head)
            .replace("{feature}", "sum" if branch else "conv1"))


@pytest.mark.parametrize("branch", [True, False], ids=["same-splits", "no-splits"])
def test_ignored_layers_match_caffe_including_its_split_layers(caffe_install, tmp_path, branch):
    source_net = tmp_path / "source.prototxt"
    source_net.write_text(residual("fc", True))
    model = save_random_weights(caffe_install, source_net, tmp_path / "source.caffemodel")
    assert "conv1_relu1_0_split" in caffemodels.layer_shapes(model)  # Net::ToProto saves Caffe's split layers
    net = tmp_path / "new.prototxt"
    net.write_text(residual("fc_new", branch))
    predicted = json.loads(CliRunner().invoke(cli, ["inspect", str(net), "--weights", str(model), "--phase", "TEST",
                                                    "--json", "--no-pycaffe"]).output)["weights"]
    log = subprocess.run([str(caffe_install.binary), "test", f"-model={net}", f"-weights={model}", "-iterations=1"],
                         capture_output=True, text=True, timeout=300)
    assert log.returncode == 0, log.stderr[-2000:]
    assert sorted(ignored_by_caffe(log.stderr)) == sorted(predicted["unused"])
    expected = ["fc"] if branch else ["conv1_relu1_0_split", "conv2", "fc", "sum"]
    assert sorted(predicted["unused"]) == expected


V1_NET = """
name: "v1net"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1" blobs_lr: 0 blobs_lr: 0
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layers { name: "relu1" type: RELU bottom: "conv1" top: "conv1" }
layers { name: "fc" type: INNER_PRODUCT bottom: "conv1" top: "fc" inner_product_param { num_output: 3 } }
layers { name: "prob" type: SOFTMAX bottom: "fc" top: "prob" }
"""


def test_legacy_v1_net_with_net_level_inputs(caffe_install, tmp_path):
    net = tmp_path / "v1.prototxt"
    net.write_text(V1_NET)
    model = save_random_weights(caffe_install, net, tmp_path / "v1.caffemodel")
    assert "input" in caffemodels.layer_shapes(model)  # Caffe turned `input:` into an Input layer named "input"
    log = subprocess.run([str(caffe_install.binary), "test", f"-model={net}", f"-weights={model}", "-iterations=1"],
                         capture_output=True, text=True, timeout=300)
    assert log.returncode == 0 and ignored_by_caffe(log.stderr) == []
    out = tmp_path / "grafted.caffemodel"
    report = graft.graft(model, net, out)
    assert report.plan.unused == [] and report.plan.names("copied") == ["conv1", "fc"]
    loaded = loaded_params(caffe_install, net, out, tmp_path / "p.npz")
    original = source_arrays(model)
    assert all(loaded[key].tobytes() == original[key].tobytes() for key in ("conv1/0", "conv1/1", "fc/0", "fc/1"))


def test_a_layer_that_lost_its_bias_keeps_its_weights(caffe_install, source, tmp_path):
    net = tmp_path / "deploy.prototxt"
    net.write_text(new_net("fc", 5).replace("kernel_size: 3 weight_filler", "kernel_size: 3 bias_term: false "
                                                                           "weight_filler"))
    out = tmp_path / "grafted.caffemodel"
    report = graft.graft(source, net, out)
    (conv,) = [lp for lp in report.plan.layers if lp.name == "conv1"]
    assert conv.state == "mismatched" and "2 blob(s) in the source, 1 in the net" in conv.detail
    loaded = loaded_params(caffe_install, net, out, tmp_path / "p.npz")
    assert loaded["conv1/0"].tobytes() == source_arrays(source)["conv1/0"].tobytes()
    assert "conv1/1" not in loaded.files


def test_graft_from_a_v1_caffemodel_with_legacy_blobs(caffe_install, tmp_path):
    """Old model-zoo files store biases as 1x1x1xN: they are copied verbatim and Caffe accepts them."""
    from caffetune.model import schema

    rng = np.random.default_rng(5)
    old = schema.current().NetParameter(name="old")
    enum = old.DESCRIPTOR.fields_by_name["layers"].message_type.fields_by_name["type"].enum_type
    arrays = {"conv1": [rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)],
              "fc": [rng.normal(size=(5, 36)), rng.normal(size=5)]}
    for name, blobs in arrays.items():
        kind = "CONVOLUTION" if name == "conv1" else "INNER_PRODUCT"
        layer = old.layers.add(name=name, type=enum.values_by_name[kind].number)
        for array in blobs:
            blob = layer.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = (1,) * (4 - array.ndim) + array.shape
            blob.data.extend(array.astype(np.float32).ravel().tolist())
    model = tmp_path / "old.caffemodel"
    model.write_bytes(old.SerializeToString())
    net = tmp_path / "deploy.prototxt"
    net.write_text(new_net("fc_new", 3).replace('layer { name: "bn1"', '# bn1').replace(
        'layer { name: "scale1"', '# scale1'))
    out = tmp_path / "grafted.caffemodel"
    report = graft.graft(model, net, out, mapping={"fc_new": "fc"}, keep=[(4, 0), (0, 1)])
    assert report.plan.names("copied") == ["conv1"] and report.plan.names("partial") == ["fc_new"]
    loaded = loaded_params(caffe_install, net, out, tmp_path / "p.npz")
    assert loaded["conv1/0"].tobytes() == arrays["conv1"][0].astype(np.float32).tobytes()
    assert loaded["conv1/1"].tobytes() == arrays["conv1"][1].astype(np.float32).tobytes()
    assert loaded["fc_new/0"][0].tobytes() == arrays["fc"][0][4].astype(np.float32).tobytes()
    assert loaded["fc_new/1"][1] == np.float32(arrays["fc"][1][0])


def test_nothing_to_graft_is_an_error(source, tmp_path):
    net = tmp_path / "other.prototxt"
    net.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                   'inner_product_param { num_output: 2 } }\n')
    with pytest.raises(NetError, match="nothing to graft"):
        graft.graft(source, net, tmp_path / "out.caffemodel")
    assert graft.graft(source, net, tmp_path / "out.caffemodel", fill_new=True).written_layers == ["ip"]
