"""A scaled-down `make demo` (few images, few iterations) on the real Caffe, and the commands it prints."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.demo import pipeline
from caffetune.errors import DatasetError
from caffetune.model import prototxt
from caffetune.train import runner

SMALL = dict(images_per_class=6, test_per_class=2, epochs=1.0, batch_size=9)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory, caffe_install):
    out = tmp_path_factory.mktemp("demo")
    lines = []
    report = pipeline.run(pipeline.DemoOptions(output=out, **SMALL), say=lines.append)
    return report, lines


def _layers(net, type_name):
    return [layer for layer in net.layer if layer.type == type_name]


def test_the_demo_runs_every_step_and_evaluates_the_held_out_images(small_demo):
    report, lines = small_demo
    assert [line.split("]")[0] for line in lines if line.startswith("[")] == [f"[{n}/6" for n in range(1, 7)]
    assert [step.name.split(":")[0] for step in report.steps] == ["model", "images", "build-lmdb", "rewrite", "run",
                                                                   "eval"]
    assert report.train_count == 50                 # 6 images per class, one of each class in val_lmdb
    assert report.run.status == "done" and report.run.iteration == 6      # one epoch of 50 images, batch 9
    assert report.weights.is_file() and report.weights.suffix == ".caffemodel"
    evaluation = report.evaluation
    assert evaluation.count == 20 and evaluation.confusion.sum() == 20
    assert [entry["count"] for entry in evaluation.per_class] == [2] * 10
    assert evaluation.class_names == (report.data / "labels.txt").read_text().split()
    assert "t-shirt_top" in evaluation.class_names and "ankle_boot" in evaluation.class_names
    assert json.loads((report.eval_dir / "eval.json").read_text())["count"] == 20
    for png in (report.curves, report.eval_dir / "confusion.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_rewritten_net_has_a_new_ten_class_head_and_a_frozen_backbone(small_demo):
    report, _ = small_demo
    net = prototxt.load(report.model_dir / "train_val.prototxt")
    head = [layer for layer in net.layer if layer.name == "fc_nsfw_fashion"][0]
    assert head.inner_product_param.num_output == 10
    assert [p.lr_mult for p in head.param] == [10, 20]
    learnable = _layers(net, "Convolution") + _layers(net, "Scale")
    assert learnable and all(p.lr_mult == 0 for layer in learnable for p in layer.param)
    assert all(layer.batch_norm_param.use_global_stats for layer in _layers(net, "BatchNorm"))
    data = _layers(net, "Data")
    assert [list(layer.transform_param.mean_value) for layer in data] == [[104, 117, 123]] * 2
    assert {layer.data_param.source for layer in data} == {str(report.data / "train_lmdb"),
                                                           str(report.data / "val_lmdb")}
    deploy = prototxt.load(report.model_dir / "deploy.prototxt")
    assert deploy.layer[0].type == "Input" and deploy.layer[-1].type == "Softmax"


def test_the_report_names_accuracy_files_and_commands(small_demo):
    report, _ = small_demo
    text = pipeline.format_report(report)
    for expected in ("top-1 accuracy on 20 held-out test images", "per class:", "confusion matrix:", "t-shirt_top",
                     str(report.curves), str(report.eval_dir), "caffetune build-lmdb", "caffetune rewrite",
                     "caffetune run", "caffetune eval", "total"):
        assert expected in text, expected


def test_the_printed_commands_do_what_the_demo_did(small_demo, tmp_path):
    """The commands a user types give the same nets, a run and an evaluation (outputs redirected to tmp_path)."""
    report, _ = small_demo
    out = report.options.output
    moved = {str(report.data): str(tmp_path / "data"), str(report.model_dir): str(tmp_path / "model"),
             str(out / "runs"): str(tmp_path / "runs"), str(out / "eval"): str(tmp_path / "eval")}
    for command in report.commands:
        for old, new in moved.items():
            command = command.replace(old, new)
        argv = shlex.split(command)
        assert argv[0] == "caffetune"
        result = CliRunner().invoke(cli, argv[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{command}\n{result.output}"
    for name in ("train_val.prototxt", "deploy.prototxt", "solver.prototxt"):
        ours = (report.model_dir / name).read_text()
        theirs = (tmp_path / "model" / name).read_text()
        for old, new in moved.items():
            theirs = theirs.replace(new, old)
        assert theirs == ours, name
    assert (tmp_path / "data" / "labels.txt").read_text() == (report.data / "labels.txt").read_text()
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["count"] == 20


def test_the_schedule_is_epochs_of_the_training_set_with_a_step_at_two_thirds():
    assert pipeline.schedule(2250, pipeline.DemoOptions(epochs=2, batch_size=25)) == (180, 120)
    assert pipeline.schedule(2250, pipeline.DemoOptions(iterations=7)) == (7, 4)


def test_long_notices_are_shortened_to_their_first_and_last_names():
    names = ", ".join(f"conv_{i}" for i in range(100))
    short = pipeline.shorten(runner.Notice("info", f"copied from w.caffemodel: {names}"))
    assert short.text == "copied from w.caffemodel: conv_0, conv_1, conv_2, ..., conv_99 (100 in all)"
    plain = runner.Notice("info", "x" * 500)
    assert pipeline.shorten(plain) is plain


def test_overwrite_deletes_only_a_folder_the_demo_wrote(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(DatasetError, match="not written by the demo"):
        pipeline.remove_earlier_output(tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / pipeline.MARKER).touch()
    pipeline.remove_earlier_output(tmp_path / "earlier")
    assert not (tmp_path / "earlier").exists()


def test_python_m_caffetune_demo_has_the_scaled_down_options():
    result = subprocess.run([sys.executable, "-m", "caffetune", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for option in ("--images-per-class", "--test-per-class", "--epochs", "--iterations", "--output", "--overwrite"):
        assert option in result.stdout
