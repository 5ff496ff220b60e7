"""`caffetune fit-head` / `run --fit-head`: the new head fitted as a linear probe on the pretrained
features, checked against the real Caffe (its own data layer feeds the fit, `caffe test` scores the result)."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.errors import DatasetError, NetError
from caffetune.model import layers, prototxt
from caffetune.transfer import head_fit

from helpers import run_pycaffe, save_random_weights, write_tiny_classifier


# --- the fit itself -----------------------------------------------------------------------------------------------
def test_softmax_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(12, 5)), rng.integers(0, 3, 12)
    onehot = np.eye(3)[labels]
    params = rng.normal(size=3 * 5 + 3)
    loss, gradient = head_fit._softmax_loss(params, features, onehot, 0.1, True)
    step = 1e-6
    numeric = [(head_fit._softmax_loss(params + step * np.eye(len(params))[i], features, onehot, 0.1, True)[0]
                - head_fit._softmax_loss(params - step * np.eye(len(params))[i], features, onehot, 0.1, True)[0])
               / (2 * step) for i in range(len(params))]
    assert loss > 0
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-7)


def test_fit_separates_separable_classes_and_scores_like_softmax():
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=4.0, size=(4, 6))
    labels = np.repeat(np.arange(4), 25)
    features = centres[labels] + rng.normal(size=(100, 6))
    weights, bias, stats = head_fit.fit_softmax(features, labels, 4, l2=1e-3)
    assert weights.shape == (4, 6) and bias.shape == (4,)
    assert stats["accuracy"] == ((features @ weights.T + bias).argmax(1) == labels).mean() == 1.0
    assert stats["loss"] < 0.1 and stats["steps"] > 0


def test_fewer_images_than_features_fit_in_their_span_exactly():
    """The reduced problem (coordinates in the span of the feature rows) has the full problem's optimum."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(4)
    labels = np.arange(12) % 3
    features = rng.normal(size=(12, 40)) + np.eye(3)[labels] @ rng.normal(size=(3, 40))
    weights, bias, stats = head_fit.fit_softmax(features, labels, 3, l2=0.05)
    direct = minimize(head_fit._softmax_loss, np.zeros(3 * 40 + 3), args=(features, np.eye(3)[labels], 0.05, True),
                      jac=True, method="L-BFGS-B", options={"maxiter": 2000, "gtol": 1e-10})
    reduced_objective = head_fit._softmax_loss(np.concatenate([weights.ravel(), bias]), features, np.eye(3)[labels],
                                              0.05, True)[0]
    assert reduced_objective == pytest.approx(direct.fun, abs=1e-6)
    np.testing.assert_allclose(weights, direct.x[:120].reshape(3, 40), atol=1e-3)
    np.testing.assert_allclose(bias, direct.x[120:], atol=1e-3)
    assert stats["accuracy"] == 1.0


def test_fit_without_bias_and_transposed_layout():
    rng = np.random.default_rng(2)
    labels = np.arange(30) % 3
    features = np.eye(3)[labels] * 5 + rng.normal(scale=0.1, size=(30, 3))
    weights, bias, _ = head_fit.fit_softmax(features, labels, 3, bias=False)
    assert bias is None
    layer = prototxt.parse('layer { name: "fc" type: "InnerProduct" inner_product_param { num_output: 3 '
                           'transpose: true } }', "NetParameter").layer[0]
    blobs = head_fit.head_blobs(layer, weights, bias)
    assert len(blobs) == 1 and blobs[0].dtype == np.dtype("<f4")
    np.testing.assert_allclose(blobs[0], weights.T.astype(np.float32))


def test_features_equal_for_every_image_are_refused():
    with pytest.raises(DatasetError, match="the input of head fc_new \\(blob pool5\\) is the same for every"):
        head_fit.check_informative(np.zeros((4, 3)), "fc_new", "pool5")
    head_fit.check_informative(np.eye(3), "fc_new", "pool5")


def test_labels_beyond_the_head_are_an_error():
    with pytest.raises(DatasetError, match="labels go up to 4 but the head has 3 outputs"):
        head_fit.fit_softmax(np.zeros((5, 2)), np.arange(5), 3)


# --- the probe net ------------------------------------------------------------------------------------------------
NET = """name: "n"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true crop_size: 4 } data_param { source: "train_lmdb" backend: LMDB batch_size: 8 rand_skip: 5 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 4 } data_param { source: "val_lmdb" backend: LMDB batch_size: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def test_probe_net_reads_the_training_source_in_the_test_phase_without_randomness():
    net = prototxt.parse(NET, "NetParameter")
    before = net.SerializeToString()
    probe = head_fit.probe_net(net)
    assert net.SerializeToString() == before                      # the caller's message is untouched
    data = [layer for layer in probe.layer if layer.type == "Data"]
    assert [layer.data_param.source for layer in data] == ["train_lmdb", "train_lmdb"]
    reader = data[1]
    assert layers.phases(reader) == {"TEST"} and layers.phases(data[0]) == {"TRAIN"}
    assert not reader.transform_param.HasField("mirror") and reader.transform_param.crop_size == 4
    assert not reader.data_param.HasField("rand_skip") and reader.data_param.batch_size == 8
    assert [layer.name for layer in probe.layer] == ["data", "data", "fc", "loss"]


def test_probe_net_of_a_data_layer_for_both_phases():
    both = NET.replace(' include { phase: TRAIN }\n', '\n', 1)
    probe = head_fit.probe_net(prototxt.parse(both, "NetParameter"))
    assert [layer.name for layer in probe.layer] == ["data", "fc", "loss"]
    assert layers.phases(probe.layer[0]) == {"TEST"} and probe.layer[0].data_param.source == "train_lmdb"


def test_probe_net_needs_one_training_data_layer():
    net = prototxt.parse(NET.replace("include { phase: TRAIN }", "include { phase: TEST }"), "NetParameter")
    with pytest.raises(NetError, match="one TRAIN-phase Data or ImageData layer; the net has 0"):
        head_fit.probe_net(net)


# --- with the real Caffe ------------------------------------------------------------------------------------------
def _rename_head(net_text: str, new: str) -> str:
    return (net_text.replace('name: "fc"', f'name: "{new}"').replace('top: "fc"', f'top: "{new}"')
            .replace('bottom: "fc"', f'bottom: "{new}"'))


@pytest.fixture()
def pretrained(caffe_install, tmp_path):
    """A tiny classifier's random weights as the 'pretrained' model, and the same net with its head renamed and
    its TEST phase reading the training LMDB (so `caffe test` scores exactly the images the head was fitted on)."""
    net, solver = write_tiny_classifier(tmp_path / "tiny", classes=4, max_iter=2, count=32)
    weights = save_random_weights(caffe_install, net, tmp_path / "pretrained.caffemodel")
    text = _rename_head(net.read_text(), "fc_new").replace("test_lmdb", "train_lmdb")
    new_net = tmp_path / "new.prototxt"
    new_net.write_text(text)
    new_solver = tmp_path / "solver.prototxt"
    new_solver.write_text(solver.read_text().replace(str(net), str(new_net)).replace("test_iter: 2", "test_iter: 4"))
    return new_net, new_solver, weights


def _caffe_test_accuracy(install, net, weights, iterations: int) -> float:
    result = subprocess.run([str(install.binary), "test", f"-model={net}", f"-weights={weights}",
                             f"-iterations={iterations}"], env=dict(install.env(), GLOG_logtostderr="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return float(re.findall(r"\] accuracy = ([0-9.]+)", result.stderr)[-1])


@pytest.mark.caffe
def test_fitted_head_scores_in_caffe_as_the_fit_computed(caffe_install, pretrained, tmp_path):
    net, _solver, weights = pretrained
    output = tmp_path / "fitted.caffemodel"
    report = head_fit.fit_heads(net, weights, output)
    [fit] = report.fits
    assert (fit.name, fit.images, fit.features, fit.classes) == ("fc_new", 32, 4 * 6 * 6, 4)
    assert report.forward_batches == 4 and report.graft.fitted == ["fc_new"]
    # Caffe's own TEST pass over the 32 training images agrees with the fit's training accuracy: the features the
    # fit saw are Caffe's, and the blobs are in Caffe's layout.
    assert fit.accuracy > 0.5          # 144 features for 32 random images: a linear probe fits most of them
    assert _caffe_test_accuracy(caffe_install, net, output, 4) == pytest.approx(fit.accuracy, abs=1e-6)
    # Every other blob is the pretrained one, bit for bit.
    same = run_pycaffe(caffe_install, """
        import sys, caffe, numpy as np
        old = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
        new = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[3])
        print(all(np.array_equal(a.data, b.data) for a, b in zip(old.params["conv1"], new.params["conv1"])))
    """, str(net), str(weights), str(output))
    assert same.stdout.strip() == "True"


@pytest.mark.caffe
def test_run_fit_head_trains_from_the_fitted_weights(caffe_install, pretrained, tmp_path):
    _net, solver, weights = pretrained
    result = CliRunner().invoke(cli, ["run", "--solver", str(solver), "--weights", str(weights), "--fit-head",
                                      "--name", "fitted", "--runs-dir", str(tmp_path / "runs"), "--max-iter", "2"])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "fitted"
    report = json.loads((run_dir / "fit-head.json").read_text())
    assert report["fits"][0]["name"] == "fc_new" and report["forward_batches"] == 4
    assert f"-weights={run_dir / 'fitted-head.caffemodel'}" in (run_dir / "command.txt").read_text()
    log = (run_dir / "caffe.log").read_text()
    assert "Ignoring source layer" not in log                     # the fitted file carries every layer
    first_test = re.search(r"Iteration 0, Testing net.*?accuracy = ([0-9.]+)", log, re.S)
    assert float(first_test.group(1)) == pytest.approx(report["fits"][0]["accuracy"], abs=1e-6)


@pytest.mark.caffe
def test_fit_head_cli_refuses_what_it_cannot_fit(caffe_install, pretrained, tmp_path):
    net, _solver, weights = pretrained
    runner = CliRunner()
    out = tmp_path / "out.caffemodel"
    conv = runner.invoke(cli, ["fit-head", str(net), "--weights", str(weights), "-o", str(out), "--head", "conv1"])
    assert conv.exit_code == 1 and "head conv1 is a Convolution layer" in str(conv.exception)
    original = net.parent / "tiny" / "train_val.prototxt"
    none_new = runner.invoke(cli, ["fit-head", str(original), "--weights", str(weights), "-o", str(out)])
    assert none_new.exit_code == 1 and "no new head to fit" in str(none_new.exception)
    assert not out.exists()
    done = runner.invoke(cli, ["fit-head", str(net), "--weights", str(weights), "-o", str(out), "--max-images", "16"])
    assert done.exit_code == 0, done.output
    assert "fitted fc_new: 16 images x 144 features -> 4 classes" in done.output
    again = runner.invoke(cli, ["fit-head", str(net), "--weights", str(weights), "-o", str(out)])
    assert again.exit_code == 1 and "the output exists" in str(again.exception)
    # A net the weights do not fit: preflight names it, before pycaffe could abort this process.
    wider = net.with_name("wider.prototxt")
    wider.write_text(net.read_text().replace("num_output: 4 kernel_size: 3", "num_output: 5 kernel_size: 3"))
    mismatch = runner.invoke(cli, ["fit-head", str(wider), "--weights", str(weights), "-o", str(tmp_path / "w.model")])
    assert mismatch.exit_code == 1 and "conv1" in str(mismatch.exception)
    assert not (tmp_path / "w.model").exists()
