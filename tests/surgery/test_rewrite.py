"""`caffetune rewrite` golden cases, semantics against Caffe's Flickr Style example, and error paths.

Each folder in tests/golden/rewrite holds case.txt (input and flags) and the expected results: for every net written,
`<role>.diff` (the unified diff of the input and the output: only the real changes), the solver as a whole file, and
plan.json (the --json plan). Every case is also re-parsed through the schema and rewritten a second time to prove
idempotence. Regenerate with CAFFETUNE_UPDATE_GOLDEN=1 after a deliberate change, and review the diff.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.errors import NetError, PrototxtError
from caffetune.model import layers, prototxt, textedit
from caffetune.surgery import rewrite

from rewrite_cases import CASES, DATA, GOLDEN, read_case

UPDATE = os.environ.get("CAFFETUNE_UPDATE_GOLDEN") == "1"


def run_rewrite(net: Path, flags: list[str], out: Path) -> dict:
    result = CliRunner(mix_stderr=False).invoke(cli, ["rewrite", str(net), *flags, "-o", str(out), "--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


def unified(before: str, after: str, role: str) -> str:
    return "".join(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "input", role, n=2))


def check_golden(path: Path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.is_file(), f"missing golden file {path}; run with CAFFETUNE_UPDATE_GOLDEN=1"
    assert actual == path.read_text(), f"{path.name} differs from the golden file"


@pytest.mark.parametrize("name", CASES)
def test_golden_case(name, caffe_source, tmp_path):
    net, flags = read_case(name, caffe_source)
    out = tmp_path / "out"
    plan = run_rewrite(net, flags, out)
    source = net.read_text()
    for role in plan["written"]:
        text = (out / f"{role}.prototxt").read_text()
        message = prototxt.parse(text, "SolverParameter" if role == "solver" else "NetParameter")
        assert message.ListFields(), f"{role} re-parses through the schema"
        if role == "solver":
            check_golden(GOLDEN / name / "solver.prototxt", text.replace(str(tmp_path), "TMP"))
        else:
            check_golden(GOLDEN / name / f"{role}.diff", unified(source, text, role))
    assert not any(output["canonical"] for output in plan["outputs"].values()), "layout kept"
    plan.pop("written")
    check_golden(GOLDEN / name / "plan.json",
                 json.dumps(plan, indent=2, sort_keys=True).replace(str(tmp_path), "TMP") + "\n")
    # Idempotence: rewriting an output with the same flags changes nothing.
    for role in ("train_val", "deploy"):
        if role not in plan["outputs"]:
            continue
        again = tmp_path / f"again_{role}"
        second = run_rewrite(out / f"{role}.prototxt", flags, again)
        assert (again / f"{role}.prototxt").read_text() == (out / f"{role}.prototxt").read_text()
        if role == plan["input_kind"]:
            for other in second["written"]:
                if other != "solver":
                    assert (again / f"{other}.prototxt").read_text() == (out / f"{other}.prototxt").read_text()


def _layers_by_name(net):
    return {layer.name: layer for layer in layers.all_layers(net)}


def test_caffenet_matches_the_flickr_style_example(caffe_source, tmp_path):
    """The layers Caffe's finetune_flickr_style changed by hand come out the same."""
    run_rewrite(caffe_source / "models/bvlc_reference_caffenet/train_val.prototxt", ["--classes", "20", "--name",
                                                                                        "flickr"], tmp_path)
    ours = _layers_by_name(prototxt.load(tmp_path / "train_val.prototxt"))
    flickr = _layers_by_name(prototxt.load(caffe_source / "models/finetune_flickr_style/train_val.prototxt"))
    assert "fc8" not in ours
    for name in ("fc8_flickr", "loss", "accuracy"):
        theirs = flickr[name]
        mine = ours[name]
        assert (mine.type, list(mine.bottom), list(mine.top)) == (theirs.type, list(theirs.bottom), list(theirs.top))
        assert list(mine.param) == list(theirs.param), name
    assert ours["fc8_flickr"].inner_product_param == flickr["fc8_flickr"].inner_product_param
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7"):
        assert ours[name] == flickr[name], f"{name} is left as the example leaves it"


def test_googlenet_heads_are_all_renamed_and_boosted(caffe_source, tmp_path):
    run_rewrite(caffe_source / "models/bvlc_googlenet/train_val.prototxt", ["--classes", "20", "--name", "x"],
                tmp_path)
    net = prototxt.load(tmp_path / "train_val.prototxt")
    view = _layers_by_name(net)
    for head in ("loss1/classifier_x", "loss2/classifier_x", "loss3/classifier_x"):
        assert view[head].inner_product_param.num_output == 20
        assert [p.lr_mult for p in view[head].param] == [10, 20]
    assert all("loss1/classifier" not in layer.bottom for layer in net.layer)
    deploy = _layers_by_name(prototxt.load(tmp_path / "deploy.prototxt"))
    assert "loss1/classifier_x" not in deploy and "loss3/classifier_x" in deploy
    assert deploy["prob"].bottom == ["loss3/classifier_x"]


def test_resnet_frozen_batchnorm_uses_global_stats_and_keeps_lr_zero(tmp_path):
    run_rewrite(DATA / "resnet_deploy.prototxt", ["--classes", "3", "--name", "new", "--freeze", "backbone"],
                tmp_path)
    net = prototxt.load(tmp_path / "train_val.prototxt")
    view = _layers_by_name(net)
    for name in ("bn_conv1", "bn2a_branch2a"):
        assert view[name].batch_norm_param.use_global_stats
        assert all(p.lr_mult == 0 for p in view[name].param)
    assert [(p.lr_mult, p.decay_mult) for p in view["conv1"].param] == [(0, 0)]          # bias_term: false
    assert [(p.lr_mult, p.decay_mult) for p in view["scale_conv1"].param] == [(0, 0), (0, 0)]
    assert [layer.type for layer in net.layer][:2] == ["Data", "Data"]
    assert view["accuracy"].bottom == ["fc_nsfw_new", "label"] and "accuracy_top5" not in view


def test_batchnorm_lr_mult_is_forced_to_zero_and_extra_param_blocks_are_trimmed():
    net_text = """
layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } } }
layer { name: "bn" type: "BatchNorm" bottom: "data" top: "data" param { lr_mult: 1 } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" param { lr_mult: 1 } param { lr_mult: 2 }
  param { lr_mult: 3 } convolution_param { num_output: 2 kernel_size: 1 bias_term: false } }
layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc" inner_product_param { num_output: 7 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
    result = rewrite.rewrite_text(net_text, rewrite.Options(classes=2, name="n"))
    view = _layers_by_name(prototxt.parse(result.outputs["train_val"].text))
    assert [p.lr_mult for p in view["bn"].param] == [0]
    assert len(view["c"].param) == 1
    assert not view["bn"].batch_norm_param.HasField("use_global_stats")


def test_accuracy_top_k_above_the_class_count_is_fixed_and_reported(caffe_source):
    text = (caffe_source / "models/bvlc_googlenet/train_val.prototxt").read_text()
    result = rewrite.rewrite_text(text, rewrite.Options(classes=3, name="three"))
    view = _layers_by_name(prototxt.parse(result.outputs["train_val"].text))
    assert view["loss3/top-5"].accuracy_param.top_k == 3
    assert any("loss3/top-5: top_k 5 > 3 classes" in note for note in result.notes)


def test_comments_and_layout_survive():
    text = (DATA / "resnet_deploy.prototxt").read_text()
    out = rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new")).outputs["deploy"].text
    assert out.startswith("# A tiny ResNet-style deploy net")
    assert 'name: "fc_nsfw_new"  # the classifier: 2 classes' in out
    assert "input_param { shape: { dim: 1 dim: 3 dim: 8 dim: 8 } }" in out


def test_textedit_falls_back_to_none_when_it_cannot_keep_the_layout():
    old = prototxt.parse('name: "a"')
    new = prototxt.parse('name: "b"')
    assert textedit.render('name: "a"', old, new) == 'name: "b"'
    assert textedit.render('name: ["a"]', old, new) is None  # list syntax: the caller writes canonical text


def test_new_name_present_in_the_weights_is_refused(tmp_path, monkeypatch):
    from caffetune.model import caffemodels as weights

    monkeypatch.setattr(weights, "layer_shapes", lambda path: {"fc_nsfw_new": [(2, 4)], "conv1": [(4, 3, 3, 3)]})
    text = (DATA / "resnet_deploy.prototxt").read_text()
    with pytest.raises(NetError, match="fc_nsfw_new"):
        rewrite.rewrite_text(text, rewrite.Options(classes=3, name="new", weights=str(tmp_path / "w.caffemodel")))


def test_cli_refuses_to_overwrite_the_input_and_needs_an_output(tmp_path):
    net = tmp_path / "train_val.prototxt"
    net.write_text((DATA / "lenet_v1.prototxt").read_text())
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(cli, ["rewrite", str(net), "--classes", "3", "-o", str(tmp_path)])
    assert isinstance(result.exception, NetError) and "overwrite the input" in str(result.exception)
    result = runner.invoke(cli, ["rewrite", str(net), "--classes", "3"])
    assert result.exit_code == 2 and "-o PATH" in result.stderr
    result = runner.invoke(cli, ["rewrite", str(net), "--classes", "3", "--name", "n", "--in-place"])
    assert result.exit_code == 0, result.stderr
    assert 'name: "ip1_n"' in net.read_text()
    result = runner.invoke(cli, ["rewrite", str(net), "--classes", "3", "--name", "n", "--check"])
    assert result.exit_code == 0, "an already rewritten net does not change"


def test_check_and_diff_write_nothing(tmp_path):
    runner = CliRunner(mix_stderr=False)
    result = runner.invoke(cli, ["rewrite", str(DATA / "resnet_deploy.prototxt"), "--classes", "3", "--check"])
    assert result.exit_code == 1 and "would change" in result.stderr
    result = runner.invoke(cli, ["rewrite", str(DATA / "resnet_deploy.prototxt"), "--classes", "3", "--name", "n",
                                 "--diff", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0
    assert '-  name: "fc_nsfw"  # the classifier: 2 classes' in result.stdout
    assert not (tmp_path / "out").exists()


def test_mixed_v1_and_current_layers_is_an_error():
    with pytest.raises(NetError, match="mixes"):
        rewrite.rewrite_text('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }',
                             rewrite.Options(classes=2))


def test_parse_error_names_line_column_and_suggests_proto(tmp_path):
    net = tmp_path / "fork.prototxt"
    net.write_text('name: "x"\nlayer {\n  name: "p"\n  prior_box_param { min_size: 3 }\n}\n')
    with pytest.raises(PrototxtError) as caught:
        rewrite.rewrite_files(net, rewrite.Options(classes=2), write=False)
    assert caught.value.where == f"{net}:4:3" and "prior_box_param" in caught.value.what
    assert "--proto" in caught.value.fix


def test_existing_solver_is_pointed_at_the_new_net_and_sized_from_epochs(caffe_source, tmp_path):
    flickr_solver = caffe_source / "models/finetune_flickr_style/solver.prototxt"
    run_rewrite(caffe_source / "models/bvlc_reference_caffenet/train_val.prototxt",
                ["--classes", "20", "--name", "flickr", "--solver", str(flickr_solver), "--epochs", "3",
                 "--train-size", "8000", "--val-size", "1000", "--batch-size", "50"], tmp_path)
    text = (tmp_path / "solver.prototxt").read_text()
    assert "# lr for fine-tuning should be lower than when starting from scratch" in text
    solver = prototxt.parse(text, "SolverParameter")
    assert solver.net == str(tmp_path / "train_val.prototxt")
    assert (solver.max_iter, solver.test_interval, list(solver.test_iter), solver.stepsize) == (480, 160, [20], 160)
    assert solver.base_lr == pytest.approx(0.001) and solver.lr_policy == "step"
    assert solver.snapshot_prefix == str(tmp_path / "flickr")
    changed = [line for line in difflib.ndiff(flickr_solver.read_text().splitlines(), text.splitlines())
               if line.startswith("+ ")]
    assert len(changed) == 6, changed   # net, test_iter, test_interval, stepsize, max_iter, snapshot_prefix


def test_list_file_sources_make_image_data_layers(tmp_path):
    text = (DATA / "lenet_v1.prototxt").read_text()
    options = rewrite.Options(classes=4, name="n", data=rewrite.DataOptions(train_source="lists/train.txt",
                                                                           val_source="lists/val.txt",
                                                                           batch_size=8, crop_size=8))
    net = prototxt.parse(rewrite.rewrite_text(text, options).outputs["train_val"].text)
    train, val = net.layers[0], net.layers[1]
    assert layers.type_name(train) == layers.type_name(val) == "ImageData"
    assert (train.image_data_param.source, train.image_data_param.batch_size) == ("lists/train.txt", 8)
    assert train.image_data_param.shuffle and not val.image_data_param.shuffle
    assert not train.HasField("data_param")


def test_option_errors_say_what_and_how_to_fix():
    text = (DATA / "resnet_deploy.prototxt").read_text()
    with pytest.raises(NetError, match="no layer of that name") as caught:
        rewrite.rewrite_text(text, rewrite.Options(classes=3, freeze_through="conv9"))
    assert "conv1" in caught.value.fix
    with pytest.raises(NetError, match="only one"):
        rewrite.rewrite_text(text, rewrite.Options(classes=3, data=rewrite.DataOptions(mean_file="m.binaryproto",
                                                                                       mean_value=(1, 2, 3))))
    with pytest.raises(NetError, match="not a classifier head"):
        rewrite.rewrite_text(text, rewrite.Options(classes=3, renames=(("conv1", "conv1_x"),)))


def test_solver_schedule_from_dataset_sizes():
    from caffetune.surgery.solver import SolverOptions, schedule

    fields = schedule(SolverOptions(epochs=4, train_size=1000, val_size=250, train_batch=32, val_batch=50))
    assert fields == {"test_iter": 5, "test_interval": 32, "max_iter": 128, "stepsize": 42}
    with pytest.raises(NetError, match="training set size"):
        schedule(SolverOptions(epochs=4))


def test_random_seed_goes_into_the_solver():
    from caffetune.surgery.solver import SolverOptions, rewrite, template_text

    solver = rewrite(prototxt.parse(template_text(), "SolverParameter"), SolverOptions(random_seed=0, max_iter=10))
    assert solver.HasField("random_seed") and solver.random_seed == 0     # 0 is a seed, not "unset"
    assert not rewrite(prototxt.parse(template_text(), "SolverParameter"), SolverOptions()).HasField("random_seed")


def test_a_binary_file_as_image_list_is_a_typed_error(tmp_path):
    from caffetune.errors import DatasetError
    from caffetune.surgery.solver import dataset_size

    binary = tmp_path / "train.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 64)
    with pytest.raises(DatasetError, match="not a text image list"):
        dataset_size(str(binary))
