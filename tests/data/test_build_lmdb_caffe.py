"""Against the real Caffe tools: our Datums equal convert_imageset's, our mean equals compute_image_mean's,
and the real `caffe train` reads our raw and encoded databases with our mean file."""
from __future__ import annotations

import os
import subprocess
import textwrap

import lmdb
import numpy as np
import pytest

from caffetune.data import dataset, imagelist, lmdb_reader, mean
from caffetune.data.dataset import BuildOptions
from caffetune.data.datum import ImageOptions

from helpers import caffe_train, write_class_folders


def _tool(install, name, *args):
    env = dict(os.environ, GLOG_minloglevel="1", GLOG_logtostderr="1")
    result = subprocess.run([str(install.tool(name)), *map(str, args)], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _raw_items(db):
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        items = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    env.close()
    return items


def _ours_and_theirs(install, tmp_path, ext, image: ImageOptions, flags=()):
    """Build ours from class folders; then convert_imageset on the very list file we wrote (same order, keys)."""
    source = write_class_folders(tmp_path / "src", classes=3, per_class=4, size=(21, 13), ext=ext, seed=5,
                                 vary_size=image.resize is not None)
    dataset.build(imagelist.from_folder(source), tmp_path / "ours", BuildOptions(image=image, seed=3, workers=2))
    resize = [f"--resize_width={image.resize[0]}", f"--resize_height={image.resize[1]}"] if image.resize else []
    _tool(install, "convert_imageset", *resize, *flags, f"{source}/", tmp_path / "ours" / "train.txt",
          tmp_path / "theirs")
    return tmp_path / "ours" / "train_lmdb", tmp_path / "theirs"


def test_png_datums_equal_convert_imagesets_byte_for_byte(caffe_install, tmp_path):
    ours, theirs = _ours_and_theirs(caffe_install, tmp_path, "png", ImageOptions(resize=(16, 12)))
    assert len(_raw_items(ours)) == 12
    assert _raw_items(ours) == _raw_items(theirs), "same keys, same serialized Datums"


def test_gray_png_datums_equal_convert_imagesets(caffe_install, tmp_path):
    ours, theirs = _ours_and_theirs(caffe_install, tmp_path, "png", ImageOptions(gray=True), flags=["--gray"])
    assert _raw_items(ours) == _raw_items(theirs)


def test_jpeg_datums_within_one_grey_level_of_convert_imagesets(caffe_install, tmp_path):
    ours, theirs = _ours_and_theirs(caffe_install, tmp_path, "jpg", ImageOptions(resize=(16, 12)))
    mine, its = list(lmdb_reader.iter_records(ours)), list(lmdb_reader.iter_records(theirs))
    assert [(k, label) for k, _, label in mine] == [(k, label) for k, _, label in its]
    for (_, a, _), (_, b, _) in zip(mine, its):
        assert a.shape == b.shape == (12, 16, 3)
        assert np.abs(a.astype(int) - b).max() <= 1


def test_encoded_datums_match_convert_imageset_encoded(caffe_install, tmp_path):
    ours, theirs = _ours_and_theirs(caffe_install, tmp_path, "jpg", ImageOptions(encoded="auto"), flags=["--encoded"])
    assert _raw_items(ours) == _raw_items(theirs), "original file bytes, as convert_imageset keeps them"
    resized, their_resized = _ours_and_theirs(caffe_install, tmp_path / "png", "png",
                                              ImageOptions(encoded="png", resize=(10, 8)),
                                              flags=["--encoded", "--encode_type=png"])
    for (k1, a, l1), (k2, b, l2) in zip(lmdb_reader.iter_records(resized), lmdb_reader.iter_records(their_resized)):
        assert (k1, l1) == (k2, l2) and np.array_equal(a, b)


@pytest.mark.parametrize("encoded", [None, "png"])
def test_mean_equals_compute_image_mean(caffe_install, tmp_path, encoded):
    ours, theirs = _ours_and_theirs(caffe_install, tmp_path, "png", ImageOptions(resize=(16, 12), encoded=encoded),
                                    flags=["--encoded"] if encoded else [])
    _tool(caffe_install, "compute_image_mean", theirs, tmp_path / "theirs_mean.binaryproto")
    _tool(caffe_install, "compute_image_mean", ours, tmp_path / "ours_by_caffe.binaryproto")
    our_mean = mean.load(tmp_path / "ours" / "mean.binaryproto")
    assert our_mean.shape == (3, 12, 16)
    np.testing.assert_allclose(our_mean, mean.load(tmp_path / "theirs_mean.binaryproto"), atol=1e-3, rtol=0)
    np.testing.assert_allclose(our_mean, mean.load(tmp_path / "ours_by_caffe.binaryproto"), atol=1e-3, rtol=0)


NET = """
name: "tiny"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mean_file: "{mean}" scale: 0.0078125 mirror: true crop_size: 10 }
  data_param { source: "{train}" backend: LMDB batch_size: 4 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { mean_file: "{mean}" scale: 0.0078125 crop_size: 10 }
  data_param { source: "{val}" backend: LMDB batch_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("encoded", [None, "auto"])
def test_real_caffe_trains_on_our_databases_with_our_mean(caffe_install, tmp_path, encoded):
    source = write_class_folders(tmp_path / "src", classes=3, per_class=6, size=(14, 12), ext="jpg", vary_size=True)
    dataset.build(imagelist.from_folder(source), tmp_path / "ds",
                  BuildOptions(image=ImageOptions(resize=(12, 12), encoded=encoded), val_fraction=0.34))
    out = tmp_path / "ds"
    net = tmp_path / "net.prototxt"
    net.write_text(NET.replace("{mean}", str(out / "mean.binaryproto")).replace("{train}", str(out / "train_lmdb"))
                   .replace("{val}", str(out / "val_lmdb")))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(textwrap.dedent(f"""
        net: "{net}"
        test_iter: 2 test_interval: 3 base_lr: 0.01 lr_policy: "fixed" display: 1 max_iter: 6
        snapshot_prefix: "{tmp_path}/snap" solver_mode: CPU
    """))
    result = caffe_train(caffe_install, solver)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done." in result.stderr
    assert "Test net output #0: accuracy" in result.stderr
    assert "Loading mean file from" in result.stderr


def test_exif_rotated_jpeg_matches_convert_imageset(caffe_install, tmp_path):
    from helpers import jpeg_with_exif, smooth_image

    (tmp_path / "src" / "a").mkdir(parents=True)
    rng = np.random.default_rng(4)
    for orientation in (1, 3, 6, 8):
        (tmp_path / "src" / "a" / f"o{orientation}.jpg").write_bytes(
            jpeg_with_exif(smooth_image(rng, 10, 14), orientation))
    dataset.build(imagelist.from_folder(tmp_path / "src"), tmp_path / "ours", BuildOptions(workers=1, shuffle=False))
    _tool(caffe_install, "convert_imageset", f"{tmp_path / 'src'}/", tmp_path / "ours" / "train.txt",
          tmp_path / "theirs")
    mine, its = list(lmdb_reader.iter_records(tmp_path / "ours" / "train_lmdb")), \
        list(lmdb_reader.iter_records(tmp_path / "theirs"))
    assert [image.shape[:2] for _, image, _ in mine] == [(10, 14), (10, 14), (14, 10), (14, 10)]
    for (k1, a, _), (k2, b, _) in zip(mine, its):
        assert k1 == k2 and a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1
