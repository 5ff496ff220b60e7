"""`run --cache-features` with the real Caffe: a cached run and a plain run of the same solver, from the same start
weights (`graft --fill --seed`), end with the same head weights and test accuracies; with mirror; with a two-layer
top; with GoogLeNet-like heads on three branches; interrupted and resumed. Every snapshot of a cached run is a
full-net caffemodel that the original train_val loads, its trunk bytes those of the start weights."""
from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest

from caffetune.errors import NetError
from caffetune.model import caffemodels
from caffetune.train import metrics, runner
from caffetune.transfer import graft

from helpers import caffe_train, run_pycaffe, save_random_weights, write_tiny_lmdb

DATA = """name: "tiny_frozen"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "{train}" backend: LMDB batch_size: 8 } transform_param { scale: 0.00390625 {mirror} {crop} } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "{test}" backend: LMDB batch_size: 8 } transform_param { scale: 0.00390625 {crop} } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
"""
HEAD = """layer { name: "fc_new" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
TWO_LAYER_TOP = """layer { name: "dense" type: "InnerProduct" bottom: "conv1" top: "dense"
  inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "relu_dense" type: "ReLU" bottom: "dense" top: "dense" }
layer { name: "fc_new" type: "InnerProduct" bottom: "dense" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
# GoogLeNet's shape: auxiliary classifiers on frozen branches at two depths, the main head at the end; blob names
# with '/' as GoogLeNet writes them.
THREE_HEADS = """layer { name: "aux1/fc" type: "InnerProduct" bottom: "conv1" top: "aux1/fc"
  param { lr_mult: 0 } param { lr_mult: 0 } inner_product_param { num_output: 8 weight_filler { type: "xavier" } } }
layer { name: "aux1/relu" type: "ReLU" bottom: "aux1/fc" top: "aux1/fc" }
layer { name: "aux1/classifier" type: "InnerProduct" bottom: "aux1/fc" top: "aux1/classifier"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss1" type: "SoftmaxWithLoss" bottom: "aux1/classifier" bottom: "label" top: "loss1"
  loss_weight: 0.3 }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2" param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "aux2/classifier" type: "InnerProduct" bottom: "conv2" top: "aux2/classifier"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss2" type: "SoftmaxWithLoss" bottom: "aux2/classifier" bottom: "label" top: "loss2"
  loss_weight: 0.3 }
layer { name: "pool" type: "Pooling" bottom: "conv2" top: "pool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc_new" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def setup_net(folder, top: str = HEAD, mirror: bool = False, max_iter: int = 30, seed: int = 7, crop: int = 0):
    """(train_val, solver, start weights): a frozen conv trunk, the given top; start weights written by graft
    --fill --seed from a 'pretrained' caffemodel that has the trunk only."""
    folder.mkdir(parents=True, exist_ok=True)
    train = write_tiny_lmdb(folder / "train_lmdb", count=36, classes=4, seed=1)    # 36: epochs wrap mid-batch
    test = write_tiny_lmdb(folder / "test_lmdb", count=16, classes=4, seed=2)
    net = folder / "train_val.prototxt"
    net.write_text(DATA.replace("{train}", str(train)).replace("{test}", str(test))
                   .replace("{mirror}", "mirror: true" if mirror else "")
                   .replace("{crop}", f"crop_size: {crop}" if crop else "") + top)
    trunk_only = folder / "trunk.prototxt"
    trunk_only.write_text(net.read_text().split('layer { name: "relu1"')[0])
    pretrained = save_random_weights(run_pycaffe_install(), trunk_only, folder / "pretrained.caffemodel")
    start = folder / "start.caffemodel"
    graft.graft(pretrained, net, start, fill_new=True, seed=3)
    solver = folder / "solver.prototxt"
    solver.write_text(f'net: "{net}"\ntest_iter: 2\ntest_interval: 10\nbase_lr: 0.05\nlr_policy: "step"\n'
                      f'gamma: 0.5\nstepsize: 10\nmomentum: 0.9\nweight_decay: 0.001\ndisplay: 1\n'
                      f'max_iter: {max_iter}\nsnapshot_prefix: "snap"\nsolver_mode: CPU\nrandom_seed: {seed}\n')
    return net, solver, start


_INSTALL = []


def run_pycaffe_install():
    return _INSTALL[0]


@pytest.fixture(autouse=True)
def _install(caffe_install, tmp_path, monkeypatch):
    _INSTALL[:] = [caffe_install]
    monkeypatch.setenv("CAFFETUNE_FEATURE_CACHE", str(tmp_path / "cache"))      # each test starts without a cache


def blobs(path):
    with caffemodels.Caffemodel(path) as model:
        return {r.name: [model.array(b, copy=True) for b in r.blobs] for r in model.layers() if r.blobs}


def spans(path):
    with caffemodels.Caffemodel(path) as model:
        return {r.name: [bytes(model.raw(*b.span)) for b in r.blobs] for r in model.layers() if r.blobs}


def accuracies(run_dir):
    return [r.values["accuracy"] for r in metrics.read_records(run_dir) if r.phase == "test"]


def train_both(tmp_path, solver, start, **options):
    results = {}
    for name, cache in (("plain", False), ("cached", True)):
        results[name] = runner.start(runner.RunOptions(solver=solver, weights=[start], name=name, keep_best=True,
                                                       runs_root=tmp_path / "runs", cache_features=cache,
                                                       **options))
    return results["plain"], results["cached"]


def assert_same_training(plain, cached, layers):
    final_plain, final_cached = blobs(plain.snapshot), blobs(cached.snapshot)
    for name in layers:
        for a, b in zip(final_plain[name], final_cached[name]):
            assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max(), name
    assert accuracies(plain.run_dir) == accuracies(cached.run_dir)
    assert len(accuracies(plain.run_dir)) == 4                     # iterations 0, 10, 20, 30


@pytest.mark.parametrize("mirror, crop", [(False, 0), (True, 0), (True, 8)],
                         ids=["deterministic", "mirror", "mirror-and-crop-the-image-size"])
def test_a_cached_run_trains_the_head_as_a_plain_run_does(tmp_path, mirror, crop):
    # crop_size 8 on 8x8 images never moves, but Caffe still draws two offsets per image after the mirror draw.
    net, solver, start = setup_net(tmp_path / "data", mirror=mirror, crop=crop)
    plain, cached = train_both(tmp_path, solver, start)
    assert plain.status == cached.status == "done" and cached.iteration == 30
    assert_same_training(plain, cached, ["fc_new"])
    run_dir = cached.run_dir
    record = json.loads((run_dir / "feature-cache.json").read_text())
    assert record["cut"]["phases"]["TRAIN"]["blobs"] == ["conv1", "label"] and record["mirror"] == mirror
    assert record["cache"]["bytes"] > 0 and record["cache"]["images"] == {"TRAIN": 36, "TEST": 16}
    launched = json.loads((run_dir / "run.json").read_text())
    assert launched["launches"][-1]["feature_cache"]["cut"]["trainable"] == ["fc_new"]
    assert "top-solver.prototxt" in (run_dir / "command.txt").read_text()
    assert "Ignoring source layer conv1" in (run_dir / "caffe.log").read_text()   # the trunk never ran in caffe
    # Full-net caffemodels: the trunk copied byte for byte from the start weights, loadable by the train_val.
    for path in [cached.snapshot, cached.best]:
        assert spans(path)["conv1"] == spans(start)["conv1"]
        assert set(blobs(path)) == {"conv1", "fc_new"}
    loaded = run_pycaffe(runner_install(), """
        import sys, caffe
        net = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
        print(float(net.params["fc_new"][0].data.sum()), float(net.params["conv1"][0].data.sum()))
    """, str(net), str(cached.best))
    head_sum, trunk_sum = map(float, loaded.stdout.split())
    assert head_sum == pytest.approx(float(blobs(cached.best)["fc_new"][0].sum()), rel=1e-5)
    assert trunk_sum == pytest.approx(float(blobs(start)["conv1"][0].sum()), rel=1e-5)


def runner_install():
    return _INSTALL[0]


def test_a_second_run_reuses_the_cache(tmp_path):
    _, solver, start = setup_net(tmp_path / "data")
    first = runner.start(runner.RunOptions(solver=solver, weights=[start], name="a", runs_root=tmp_path / "runs",
                                           cache_features=True))
    second = runner.start(runner.RunOptions(solver=solver, weights=[start], name="b", runs_root=tmp_path / "runs",
                                            cache_features=True, lr_factor=0.5))
    one, two = (json.loads((r.run_dir / "feature-cache.json").read_text())["cache"] for r in (first, second))
    assert not one["reused"] and two["reused"] and one["folder"] == two["folder"]


def test_a_two_layer_top(tmp_path):
    _, solver, start = setup_net(tmp_path / "data", top=TWO_LAYER_TOP)
    plain, cached = train_both(tmp_path, solver, start)
    assert_same_training(plain, cached, ["dense", "fc_new"])


def test_googlenet_like_heads_on_three_branches(tmp_path):
    _, solver, start = setup_net(tmp_path / "data", top=THREE_HEADS)
    plain, cached = train_both(tmp_path, solver, start)
    assert_same_training(plain, cached, ["aux1/classifier", "aux2/classifier", "fc_new"])
    record = json.loads((cached.run_dir / "feature-cache.json").read_text())
    assert record["cut"]["phases"]["TRAIN"]["blobs"] == ["aux1/fc", "label", "conv2", "pool"]
    assert spans(cached.snapshot)["aux1/fc"] == spans(start)["aux1/fc"]
    losses = {k for r in metrics.read_records(cached.run_dir) if r.phase == "train" for k in r.values}
    assert {"loss", "loss1", "loss2"} <= losses


def test_an_interrupted_cached_run_resumes_as_a_plain_run_resumes(tmp_path):
    _, solver, start = setup_net(tmp_path / "data", max_iter=4000)
    sent = []

    def interrupt(item):
        if isinstance(item, runner.Progress) and item.iteration >= 40 and not sent:
            sent.append(item.iteration)
            signal.raise_signal(signal.SIGINT)        # the runner forwards it to caffe: snapshot, then stop

    stopped = runner.start(runner.RunOptions(solver=solver, weights=[start], name="cut", keep_best=False,
                                             runs_root=tmp_path / "runs", cache_features=True), callback=interrupt)
    assert stopped.status == "interrupted"
    at = runner.snapshot_iteration(stopped.solverstate)
    assert 40 <= at < 4000 and set(blobs(stopped.snapshot)) == {"conv1", "fc_new"}   # assembled at the stop
    resumed = runner.resume(stopped.run_dir)
    assert resumed.status == "done" and resumed.iteration == 4000
    assert set(blobs(resumed.snapshot)) == {"conv1", "fc_new"}
    train = [r.iteration for r in metrics.read_records(stopped.run_dir) if r.phase == "train"]
    assert train == list(range(4001))
    # The plain reference: caffe train to the same iteration, then resumed from its solverstate.
    reference = tmp_path / "reference"
    reference.mkdir()
    text = solver.read_text().replace('snapshot_prefix: "snap"', f'snapshot_prefix: "{reference}/ref"')
    first = reference / "first.prototxt"
    first.write_text(text.replace("max_iter: 4000", f"max_iter: {at}"))
    full = reference / "full.prototxt"
    full.write_text(text)
    assert caffe_train(runner_install(), first, f"-weights={start}").returncode == 0
    finished = caffe_train(runner_install(), full, f"-snapshot={reference}/ref_iter_{at}.solverstate")
    assert finished.returncode == 0, finished.stderr[-2000:]
    expected = blobs(reference / "ref_iter_4000.caffemodel")["fc_new"]
    for a, b in zip(expected, blobs(resumed.snapshot)["fc_new"]):
        assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()


def test_cache_features_refuses_with_the_reason_and_the_default_falls_back(tmp_path):
    _, solver, start = setup_net(tmp_path / "data", crop=6)           # TRAIN: a random 6x6 crop every time
    with pytest.raises(NetError, match="random crop"):
        runner.start(runner.RunOptions(solver=solver, weights=[start], name="refused", runs_root=tmp_path / "runs",
                                       cache_features=True))
    seen = []
    result = runner.start(runner.RunOptions(solver=solver, weights=[start], name="auto", runs_root=tmp_path / "runs"),
                          callback=seen.append)
    assert result.status == "done" and not (result.run_dir / "feature-cache.json").exists()
    assert any(isinstance(i, runner.Notice) and "random crop" in i.text for i in seen)
    assert re.search(r"conv1 does not need backward", (result.run_dir / "caffe.log").read_text())


def test_cache_crops_approximates_random_crops_and_says_so(tmp_path):
    _, solver, start = setup_net(tmp_path / "data", crop=6, mirror=True)   # 6x6 crops of 8x8 images, flipped
    seen = []
    result = runner.start(runner.RunOptions(solver=solver, weights=[start], name="crops", runs_root=tmp_path / "runs",
                                            cache_features=True, cache_crops=3), callback=seen.append)
    assert result.status == "done" and set(blobs(result.snapshot)) == {"conv1", "fc_new"}
    record = json.loads((result.run_dir / "feature-cache.json").read_text())
    assert record["cache"]["crops"] == 3 and record["mirror"]
    assert any("approximated" in note for note in record["notes"])
    assert any(isinstance(i, runner.Notice) and "approximated" in i.text for i in seen)
    import h5py

    listed = (result.run_dir / "features" / "train-sequence.txt").read_text().split()
    with h5py.File(listed[0], "r") as handle:
        rows, labels = handle["conv1"][...], handle["label"][...]
    assert rows.shape == (30 * 8, 4, 4, 4)                   # max_iter x batch rows of a 6x6 crop's conv1
    assert (labels == np.arange(30 * 8) % 36 % 4).all()      # record k mod 36, labels cycling through 4 classes
    first_epoch = rows[:36].reshape(36, -1)
    assert len({row.tobytes() for row in rows.reshape(len(rows), -1)}) > 36         # several crops per image
    assert not np.allclose(first_epoch, rows[36:72].reshape(36, -1))               # another crop next epoch
