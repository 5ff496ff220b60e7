"""Against the real Caffe: every rewritten net loads and runs in pycaffe, and `caffe train -weights BASE`
copies every layer except the renamed heads."""
from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli

from helpers import caffe_train, run_pycaffe, save_random_weights, write_tiny_lmdb
from rewrite_cases import CASES, DATA, read_case


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory):
    """Tiny LMDBs: 227x227 images for the ImageNet nets (crop 224/227), 8x8 ones for the small nets."""
    root = tmp_path_factory.mktemp("lmdb")
    return {"big": write_tiny_lmdb(root / "big_lmdb", count=4, height=227, width=227),
            "small": write_tiny_lmdb(root / "small_lmdb", count=16, height=8, width=8)}


def rewrite_cli(*args: str) -> None:
    result = CliRunner(mix_stderr=False).invoke(cli, ["rewrite", *map(str, args)])
    assert result.exit_code == 0, (result.stderr, result.exception)


def _with_tiny_data(flags: list[str], source) -> list[str]:
    """The case's flags, with its data sources replaced by a real tiny LMDB and a small batch."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag in ("--train-source", "--val-source", "--batch-size"):
            skip = True
            continue
        kept.append(flag)
    mean = [] if "--mean-value" in kept else ["--mean-value", "104,117,123"]   # CaffeNet's mean file is not here
    return kept + mean + ["--train-source", str(source), "--val-source", str(source), "--batch-size", "2"]


FORWARD = """
    import sys, caffe
    caffe.set_mode_cpu()
    for path, phase in zip(sys.argv[1::2], sys.argv[2::2]):
        net = caffe.Net(path, getattr(caffe, phase))
        if phase == "TEST" or "Input" not in [layer.type for layer in net.layers]:
            out = net.forward()
        print(path, phase, sorted(net.blobs)[:1], flush=True)
"""


@pytest.mark.parametrize("name", CASES)
def test_rewritten_nets_load_and_run_in_real_caffe(name, caffe_install, caffe_source, lmdbs, tmp_path):
    net, flags = read_case(name, caffe_source)
    big = net.is_relative_to(caffe_source)
    rewrite_cli(net, *_with_tiny_data(flags, lmdbs["big" if big else "small"]), "-o", tmp_path / "out")
    train_val, deploy = tmp_path / "out" / "train_val.prototxt", tmp_path / "out" / "deploy.prototxt"
    run_pycaffe(caffe_install, FORWARD, str(train_val), "TRAIN", str(train_val), "TEST", str(deploy), "TEST")


def _blobs_script() -> str:
    return """
        import sys, caffe, numpy as np
        caffe.set_mode_cpu()
        net = caffe.Net(sys.argv[1], sys.argv[2], caffe.TEST)
        np.savez(sys.argv[3], **{f"{name}|{i}": blob.data for name, blobs in net.params.items()
                                 for i, blob in enumerate(blobs)})
    """


def learned_blobs(install, net_path, weights, out) -> dict[str, list[np.ndarray]]:
    run_pycaffe(install, _blobs_script(), str(net_path), str(weights), str(out))
    blobs: dict[str, list] = {}
    with np.load(out) as stored:
        for key in sorted(stored.files, key=lambda k: (k.split("|")[0], int(k.split("|")[1]))):
            blobs.setdefault(key.split("|")[0], []).append(stored[key])
    return blobs


def ignored_layers(log: str) -> set[str]:
    return set(re.findall(r"Ignoring source layer (\S+)", log))


def train(install, out_dir, base, *extra_solver: str):
    solver = out_dir / "solver.prototxt"
    solver.write_text(solver.read_text() + "\n".join(extra_solver) + "\n")
    result = caffe_train(install, solver, f"-weights={base}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done." in result.stderr
    return result.stderr


def test_resnet_deploy_fine_tunes_from_base_weights_with_a_frozen_backbone(caffe_install, lmdbs, tmp_path):
    """A deploy-only ResNet with BatchNorm: frozen layers keep exactly the BASE weights, the new head trains."""
    deploy = DATA / "resnet_deploy.prototxt"
    base = save_random_weights(caffe_install, deploy, tmp_path / "base.caffemodel")
    out = tmp_path / "out"
    rewrite_cli(deploy, "--classes", "3", "--name", "new", "--freeze", "backbone", "--train-source",
                lmdbs["small"], "--val-source", lmdbs["small"], "--batch-size", "4", "--solver", "template",
                "--max-iter", "4", "--base-lr", "0.1", "--solver-mode", "CPU", "-o", out)
    log = train(caffe_install, out, base)
    assert "fc_nsfw" in ignored_layers(log) and "conv1" not in ignored_layers(log)
    before = learned_blobs(caffe_install, deploy, base, tmp_path / "before.npz")
    after = learned_blobs(caffe_install, out / "deploy.prototxt", out / "new_iter_4.caffemodel",
                          tmp_path / "after.npz")
    assert set(after) == set(before) - {"fc_nsfw"} | {"fc_nsfw_new"}
    for name in set(before) - {"fc_nsfw"}:
        for old, new in zip(before[name], after[name]):
            np.testing.assert_array_equal(old, new, err_msg=f"{name} was copied and stayed frozen")
    assert after["fc_nsfw_new"][0].shape == (3, 4)
    assert np.abs(after["fc_nsfw_new"][0]).sum() > 0


def test_v1_net_fine_tunes_from_base_weights(caffe_install, lmdbs, tmp_path):
    """A legacy V1 net, edited in V1 terms (blobs_lr), trains in Caffe from its own BASE weights."""
    original = tmp_path / "lenet_v1.prototxt"
    original.write_text(re.sub(r'source: "[^"]+"', f'source: "{lmdbs["small"]}"',
                               (DATA / "lenet_v1.prototxt").read_text()))
    base = save_random_weights(caffe_install, original, tmp_path / "base.caffemodel")
    out = tmp_path / "out"
    rewrite_cli(original, "--classes", "4", "--name", "new", "--freeze-through", "conv1", "--solver", "template",
                "--max-iter", "3", "--solver-mode", "CPU", "-o", out)
    assert "blobs_lr: 0" in (out / "train_val.prototxt").read_text()
    log = train(caffe_install, out, base)
    before = learned_blobs(caffe_install, original, base, tmp_path / "before.npz")
    assert ignored_layers(log) & set(before) == {"ip1"}, "only the renamed head is not copied"
    after = learned_blobs(caffe_install, out / "train_val.prototxt", out / "new_iter_3.caffemodel",
                          tmp_path / "after.npz")
    for old, new in zip(before["conv1"], after["conv1"]):
        np.testing.assert_array_equal(old, new)
    assert after["ip1_new"][0].shape == (4, 4 * 6 * 6)


@pytest.mark.slow
def test_caffenet_fine_tunes_from_base_weights_ignoring_only_fc8(caffe_install, caffe_source, lmdbs, tmp_path):
    """CaffeNet rewritten like the Flickr Style example: Caffe copies conv1..fc7 and ignores only fc8."""
    base = save_random_weights(caffe_install, caffe_source / "models/bvlc_reference_caffenet/deploy.prototxt",
                               tmp_path / "base.caffemodel")
    out = tmp_path / "out"
    rewrite_cli(caffe_source / "models/bvlc_reference_caffenet/train_val.prototxt", "--classes", "20", "--name",
                "flickr", "--weights", base, "--train-source", lmdbs["big"], "--val-source", lmdbs["big"],
                "--batch-size", "1", "--mean-value", "104,117,123", "--solver", "template", "--max-iter", "1",
                "--solver-mode", "CPU", "-o", out)
    log = train(caffe_install, out, base, "snapshot_after_train: false")
    learnable = {"conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"}
    assert ignored_layers(log) & learnable == {"fc8"}, "conv1..fc7 are copied, fc8 is not"


def test_weights_with_the_new_name_are_refused(caffe_install, tmp_path):
    deploy = DATA / "resnet_deploy.prototxt"
    renamed = tmp_path / "renamed.prototxt"
    renamed.write_text(deploy.read_text().replace('"fc_nsfw"', '"fc_nsfw_new"'))
    base = save_random_weights(caffe_install, renamed, tmp_path / "base.caffemodel")
    result = CliRunner(mix_stderr=False).invoke(cli, ["rewrite", str(deploy), "--classes", "3", "--name", "new",
                                                      "--weights", str(base), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "fc_nsfw_new" in str(result.exception)
    assert not (tmp_path / "out").exists()
