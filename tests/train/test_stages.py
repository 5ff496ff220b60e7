"""Two-stage fine-tuning - heads only with the backbone frozen, then unfreeze with a lower base_lr,
starting from stage one's weights."""
from __future__ import annotations

import json

import numpy as np
import pytest

from caffetune.errors import NetError
from caffetune.model import prototxt
from caffetune.train import metrics, runner, stages

from helpers import save_random_weights, write_tiny_classifier


def _blobs(caffemodel, layer_name: str) -> list[np.ndarray]:
    net = prototxt.load_binary(caffemodel)
    layer = next(layer for layer in net.layer if layer.name == layer_name)
    return [np.asarray(blob.data, np.float32) for blob in layer.blobs]


def _lr_mults(net_file, layer_name: str) -> list[float]:
    net = prototxt.load(net_file)
    layer = next(layer for layer in net.layer if layer.name == layer_name)
    return [spec.lr_mult for spec in layer.param]


def test_two_stages_second_starts_from_the_first_ones_weights(caffe_install, tmp_path):
    net, solver = write_tiny_classifier(tmp_path / "data", max_iter=20, test_interval=10, base_lr=0.05)
    pretrained = save_random_weights(caffe_install, net, tmp_path / "pretrained.caffemodel")
    options = runner.RunOptions(solver=solver, weights=[pretrained], name="two", runs_root=tmp_path / "runs")
    plan = stages.StagePlan(unfreeze_from="conv1", stage1_iter=20, stage2_iter=10, lr_factor=0.1)
    first, second = stages.run_two_stages(options, plan)
    root = tmp_path / "runs" / "two"
    assert first.run_dir == root / "stage1" and second.run_dir == root / "stage2"
    # Stage one: only the head trains; conv1 keeps the pretrained values exactly.
    assert _lr_mults(first.run_dir / "train_val.prototxt", "conv1") == [0.0, 0.0]
    for before, after in zip(_blobs(pretrained, "conv1"), _blobs(first.best, "conv1")):
        np.testing.assert_array_equal(before, after)
    assert not np.array_equal(_blobs(pretrained, "fc")[0], _blobs(first.best, "fc")[0])
    # Stage two starts from stage one's best weights, with every layer trainable and a tenth of the base_lr.
    assert (second.run_dir / "command.txt").read_text().strip().endswith(f"-weights={first.best}")
    assert _lr_mults(second.run_dir / "train_val.prototxt", "conv1") == []
    assert prototxt.load(second.run_dir / "solver.prototxt", "SolverParameter").base_lr == pytest.approx(0.005)
    # The same weights on the same 16 test images give the same accuracy: stage two's first test pass equals
    # the accuracy stage one's best.caffemodel was kept for.
    first_test = next(r for r in metrics.read_records(second.run_dir) if r.phase == "test")
    assert first_test.iteration == 0 and first_test.values["accuracy"] == first.best_accuracy
    overall = json.loads((root / "best.json").read_text())
    assert overall["accuracy"] == max(first.best_accuracy, second.best_accuracy)
    assert (root / "best.caffemodel").is_file()


def test_unfreeze_from_an_unknown_layer_is_an_error(tmp_path):
    net = prototxt.parse('layer { name: "conv1" type: "Convolution" convolution_param { num_output: 2 } }')
    with pytest.raises(NetError, match="--unfreeze-from conv9"):
        stages.freeze_before("conv9")(net)


def test_freeze_before_keeps_the_named_layer_and_later_ones_trainable():
    net = prototxt.parse("""
        layer { name: "conv1" type: "Convolution" convolution_param { num_output: 2 } }
        layer { name: "conv2" type: "Convolution" convolution_param { num_output: 2 } }
        layer { name: "fc" type: "InnerProduct" inner_product_param { num_output: 2 } }""")
    frozen = stages.freeze_before("conv2")(net)
    assert [[p.lr_mult for p in layer.param] for layer in frozen.layer] == [[0.0, 0.0], [], []]
    assert len(net.layer[0].param) == 0, "the caller's net is not changed"


def test_an_interrupted_first_stage_resumes_then_runs_the_second(caffe_install, tmp_path):
    import os
    import signal

    net, solver = write_tiny_classifier(tmp_path / "data", max_iter=400, test_interval=100)
    pretrained = save_random_weights(caffe_install, net, tmp_path / "pretrained.caffemodel")
    options = runner.RunOptions(solver=solver, weights=[pretrained], name="cut", runs_root=tmp_path / "runs")
    plan = stages.StagePlan(stage1_iter=400, stage2_iter=20)
    sent = []

    def ctrl_c_at_iteration_30(item):
        # What a Ctrl-C in the terminal does: SIGINT to caffetune's process, which forwards it to caffe.
        if isinstance(item, runner.Progress) and item.iteration >= 30 and not sent:
            sent.append(item.iteration)
            os.kill(os.getpid(), signal.SIGINT)

    results = stages.run_two_stages(options, plan, callback=ctrl_c_at_iteration_30)
    assert [r.status for r in results] == ["interrupted"]
    stopped_at = results[0].iteration
    assert 30 <= stopped_at < 400
    root = tmp_path / "runs" / "cut"
    assert stages.is_staged(root)
    first, second = stages.resume_stages(root)
    assert first.status == "done" and first.iteration == 400
    train = [r.iteration for r in metrics.read_records(first.run_dir) if r.phase == "train"]
    assert train == list(range(401))
    assert second.status == "done" and second.run_dir == root / "stage2"
    assert (second.run_dir / "command.txt").read_text().strip().endswith(f"-weights={first.best}")
