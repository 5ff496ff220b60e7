"""Preflight on the data: each fault seeded into the good tiny setup is caught with what, where, why and fix, and the
real Caffe shows what happens without the check. Good setups stay free of errors and warnings."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from caffetune.model import schema
from caffetune.train import data_scan

from helpers import caffe_train, run_pycaffe, save_random_weights
from preflight_helpers import (
    assert_clean,
    check_text,
    edited,
    fatal_line,
    only,
    random_chw,
    tiny_setup,
    train,
    write_images,
    write_list,
    write_records,
)

TRAIN_TRANSFORM = ("transform_param { scale: 0.00390625 } }\nlayer { name: \"data\" type: \"Data\" top: \"data\" top: "
                   "\"label\" include { phase: TEST }")


@pytest.fixture()
def setup(tmp_path):
    net, solver = tiny_setup(tmp_path / "tiny")
    return tmp_path, net, solver


def _with_train_source(net, source, transform: str | None = None) -> str:
    text = edited(net, (str(net.parent / "train_lmdb"), str(source)))
    if transform:
        text = text.replace(TRAIN_TRANSFORM, TRAIN_TRANSFORM.replace("scale: 0.00390625", transform), 1)
    return text


def test_the_good_setup_is_clean(setup):
    _, net, solver = setup
    assert_clean(check_text(net.read_text(), solver_text=solver.read_text()))


# --- 1. images of different sizes in one LMDB ------------------------------------------------------------------
def _mixed_sizes(path, rng):
    records = [(random_chw(rng, 3, 8, 8), i % 4) for i in range(24)]
    records[9] = (random_chw(rng, 3, 10, 10), 1)
    return write_records(path, records)


def test_records_of_different_sizes_are_an_error_and_crash_caffe(setup, caffe_install):
    folder, net, solver = setup
    mixed = _mixed_sizes(folder / "mixed_lmdb", np.random.default_rng(0))
    text = _with_train_source(net, mixed)
    message = only(check_text(text).problems)
    assert "have 2 different sizes: 3x8x8 (CxHxW) x23 (first: 00000000), 3x10x10 (CxHxW) x1 (first: 00000009)" \
        in message
    assert "--resize WxH" in message and "crop_size <= 8" in message and "K_ == new_K" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and "Check failed" in fatal_line(result)


def test_records_of_different_sizes_with_a_crop_are_fine(setup):
    folder, net, _ = setup
    mixed = _mixed_sizes(folder / "mixed_lmdb", np.random.default_rng(0))
    assert_clean(check_text(_with_train_source(net, mixed, "scale: 0.00390625 crop_size: 6")))


# --- 2. records written from H x W x C arrays ------------------------------------------------------------------
def test_transposed_records_are_named_as_such(setup, caffe_install):
    folder, net, solver = setup
    rng = np.random.default_rng(1)
    # caffe.io.array_to_datum(image) with an OpenCV image (H x W x C) gives channels=H, height=W, width=C.
    hwc = write_records(folder / "hwc_lmdb", [(random_chw(rng, 8, 8, 3), i % 4) for i in range(16)])
    text = _with_train_source(net, hwc)
    weights = save_random_weights(caffe_install, net, folder / "pretrained.caffemodel")
    report = check_text(text, weights=[weights])
    message = only(report.problems)
    assert "look transposed: record 00000000 says 8 channels of 8x3 pixels" in message
    assert "image.transpose(2, 0, 1)" in message and "array_to_datum" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text(), f"-weights={weights}")
    assert result.returncode != 0 and "Cannot copy param 0 weights from layer 'conv1'" in fatal_line(result)


# --- 3. an image missing anywhere in an ImageData list ---------------------------------------------------------
IMAGE_DATA = """name: "tiny_images"
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  image_data_param {{ source: "{train}" root_folder: "{root}/" batch_size: 4 {resize} {shuffle} }}
  transform_param {{ scale: 0.00390625 {crop} }} }}
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TEST }}
  image_data_param {{ source: "{test}" root_folder: "{root}/" batch_size: 4 {resize} }}
  transform_param {{ scale: 0.00390625 {crop} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
"""


def _image_setup(folder, count=24, vary=False, resize="", crop="", shuffle="shuffle: true", by_class=False):
    root = folder / "photos"
    entries = write_images(root, count, (12, 12))
    if by_class:
        entries.sort(key=lambda entry: entry[1])
    if vary:
        for index in range(0, count, 5):
            image = cv2.imread(str(root / entries[index][0]))
            cv2.imwrite(str(root / entries[index][0]), cv2.resize(image, (16 + index % 3, 14)))
    train_list = write_list(folder / "train.txt", entries)
    test_list = write_list(folder / "val.txt", entries[:8])
    return IMAGE_DATA.format(train=train_list, test=test_list, root=root, resize=resize, crop=crop,
                             shuffle=shuffle), train_list


def _solver(folder, max_iter=8):
    return (f'net: "{folder / "train_val.prototxt"}"\ntest_iter: 2\ntest_interval: 100\nbase_lr: 0.01\n'
            f'lr_policy: "fixed"\nmax_iter: {max_iter}\ndisplay: 1\nsolver_mode: CPU\nsnapshot_prefix: "{folder}/s"\n')


def test_an_image_missing_late_in_the_list_is_an_error_and_crashes_caffe(tmp_path, caffe_install):
    text, train_list = _image_setup(tmp_path)
    (tmp_path / "photos" / "img022.png").unlink()
    message = only(check_text(text).problems)
    assert f"1 of the 24 images listed in {train_list} are missing" in message
    assert f"{train_list}:23: {tmp_path}/photos/img022.png" in message
    assert "remove the missing images from the list" in message and "Could not load" in message
    result = train(caffe_install, tmp_path, text, _solver(tmp_path))
    assert result.returncode != 0 and "Could not load img022.png" in fatal_line(result)


def test_a_blank_line_in_the_list_is_an_error(tmp_path):
    text, train_list = _image_setup(tmp_path)
    train_list.write_text(train_list.read_text() + "\n")
    message = only(check_text(text).problems)
    assert f"the first, {train_list}:25: a blank line" in message


def test_image_data_with_resize_and_crop_is_clean_and_trains(tmp_path, caffe_install):
    text, _ = _image_setup(tmp_path, vary=True, resize="new_height: 10 new_width: 10", crop="crop_size: 8")
    assert_clean(check_text(text, solver_text=_solver(tmp_path)))
    result = train(caffe_install, tmp_path, text, _solver(tmp_path, max_iter=2))
    assert result.returncode == 0, fatal_line(result)


def test_image_data_of_varying_sizes_without_resize_is_an_error(tmp_path):
    text, train_list = _image_setup(tmp_path, vary=True)
    message = check_text(text).problems[0]
    assert "different sizes" in message.what and "image_data_param new_height and new_width" in message.fix
    assert f"{train_list}:1" in message.what


# --- 4. a mean file at the crop size --------------------------------------------------------------------------
def _mean_file(path, channels, size, value=100.0):
    blob = schema.current().BlobProto()
    blob.shape.dim.extend([1, channels, size, size])
    blob.data.extend([value] * (channels * size * size))
    path.write_bytes(blob.SerializeToString())
    return path


def test_a_mean_file_at_the_crop_size_is_explained_and_crashes_caffe(setup, caffe_install):
    folder, net, solver = setup
    mean_file = _mean_file(folder / "mean.binaryproto", 3, 6)
    text = edited(net, ("transform_param { scale: 0.00390625 }",
                        f'transform_param {{ scale: 0.00390625 crop_size: 6 mean_file: "{mean_file}" }}'))
    problems = check_text(text).problems
    assert len(problems) == 2   # the TRAIN and the TEST data layer
    message = str(problems[0])
    assert "is 3x6x6 (CxHxW), the crop size, but the stored images are 3x8x8 (CxHxW)" in message
    assert "subtracts the mean from the whole image before cropping" in message
    assert "mean_value: 100.0 mean_value: 100.0 mean_value: 100.0" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and "datum_height == data_mean_.height()" in fatal_line(result)


def test_the_mean_value_fix_text_reads_right(setup):
    folder, net, _ = setup
    gray = write_records(folder / "gray_lmdb", [(random_chw(np.random.default_rng(2), 1, 8, 8), i % 4)
                                                 for i in range(16)])
    text = _with_train_source(net, gray, "scale: 0.00390625 mean_value: 1 mean_value: 2 mean_value: 3")
    problem = check_text(text).problems
    assert len(problem) == 1 and problem[0].what == "3 mean_value entries for 1-channel images"
    assert problem[0].fix == "give one mean_value entry"
    text = _with_train_source(net, folder / "tiny" / "train_lmdb", "scale: 0.00390625 mean_value: 1 mean_value: 2")
    problem = check_text(text).problems
    assert len(problem) == 1 and problem[0].fix == "give one mean_value entry, or 3 (one per channel)"


# --- 12. a training LMDB sorted by class ---------------------------------------------------------------------
def test_a_class_sorted_training_lmdb_is_a_warning_and_caffe_reads_it_in_order(setup, caffe_install):
    folder, net, solver = setup
    rng = np.random.default_rng(3)
    ordered = write_records(folder / "sorted_lmdb", [(random_chw(rng, 3, 8, 8), i // 8) for i in range(32)])
    text = _with_train_source(net, ordered)
    report = check_text(text, solver_text=solver.read_text())
    assert report.problems == []
    message = only(report.warnings)
    assert "is sorted by class: its labels come in 4 runs of 8 records" in message
    assert "a batch of 8 holds one class" in message and "--no-shuffle" in message
    # Caffe's Data layer does not shuffle: each TRAIN batch of 8 is one class, in key order.
    (folder / "reader.prototxt").write_text(text.split('layer { name: "conv1"')[0])
    labels = run_pycaffe(caffe_install, """
        import sys, caffe
        caffe.set_mode_cpu()
        net = caffe.Net(sys.argv[1], caffe.TRAIN)
        for _ in range(4):
            net.forward()
            print(sorted(set(net.blobs["label"].data.astype(int).tolist())))
    """, str(folder / "reader.prototxt")).stdout.split("\n")
    assert labels[:4] == ["[0]", "[1]", "[2]", "[3]"]


def test_a_sorted_image_list_is_a_warning_unless_shuffled(tmp_path):
    text, _ = _image_setup(tmp_path / "a", shuffle="", by_class=True)
    assert "set image_data_param.shuffle: true" in only(check_text(text).warnings)
    text, _ = _image_setup(tmp_path / "b", by_class=True)
    assert_clean(check_text(text))


# --- good: gray encoded records ------------------------------------------------------------------------------
def test_gray_encoded_records_are_sized_from_their_headers(tmp_path):
    rng = np.random.default_rng(4)
    images = [cv2.imencode(".png", rng.integers(0, 256, (9, 7), dtype=np.uint8))[1].tobytes() for _ in range(6)]
    path = write_records(tmp_path / "enc", [(image, i % 2) for i, image in enumerate(images)])
    scan = data_scan.scan_lmdb(path)
    assert scan.encoded and scan.count == 6 and scan.sizes == {(1, 9, 7): ("00000000", 6)}
    assert scan.runs == 6 and dict(scan.labels) == {0: 3, 1: 3}


def test_a_sampled_size_check_says_what_it_sampled(setup, monkeypatch):
    folder, net, _ = setup
    monkeypatch.setattr(data_scan, "ENCODED_SIZE_SAMPLE", 3)
    rng = np.random.default_rng(6)
    images = [cv2.imencode(".png", rng.integers(0, 256, (8, 10 if i == 2 else 8, 3), dtype=np.uint8))[1].tobytes()
              for i in range(6)]
    mixed = write_records(folder / "enc_mixed", [(image, i % 4) for i, image in enumerate(images)])
    message = only(check_text(_with_train_source(net, mixed)).problems)
    assert "(sizes read from a sample of 3 of 6 records)" in message
    # every second record was sized: 0, 2 and 4
    assert "3x8x8 (CxHxW) x2 (first: 00000000), 3x8x10 (CxHxW) x1 (first: 00000002)" in message


# --- paths that caffe resolves from its own working directory -------------------------------------------------------
def test_relative_image_paths_without_root_folder_are_an_error_and_caffe_cannot_load_them(tmp_path, caffe_install):
    text, train_list = _image_setup(tmp_path)
    train_list.write_text("".join(f"photos/{line}\n" for line in train_list.read_text().splitlines()))
    text = text.replace(f'source: "{train_list}" root_folder: "{tmp_path / "photos"}/"', f'source: "{train_list}"')
    message = only(check_text(text).problems)
    assert f"24 of the 24 images listed in {train_list} have relative paths and image_data_param has no " \
           f"root_folder (e.g. {train_list}:1: photos/img000.png)" in message
    assert 'root_folder: "./"' in message and "starts caffe in the run directory" in message
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (tmp_path / "train_val.prototxt").write_text(text)
    (tmp_path / "solver.prototxt").write_text(_solver(tmp_path))
    result = caffe_train(caffe_install, tmp_path / "solver.prototxt", cwd=run_dir)   # as `caffetune run` does
    assert result.returncode != 0 and "Could not load photos/img" in fatal_line(result)
    assert_clean(check_text(text.replace(f'source: "{train_list}"',
                                         f'source: "{train_list}" root_folder: "{tmp_path}/"')))


# --- records with no image content ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make, expected", [
    (lambda rng: rng.random((3, 8, 8)).round().astype(np.uint8), "are all 0 or 1 (the 32 records sampled of 32)"),
    (lambda rng: np.full((3, 8, 8), rng.integers(0, 256), np.uint8), "every image of"),
])
def test_records_without_image_content_are_an_error_and_caffe_trains_on_them(setup, caffe_install, make, expected):
    folder, net, solver = setup
    rng = np.random.default_rng(0)
    source = write_records(folder / "blank", [(make(rng), index % 4) for index in range(32)])
    text = _with_train_source(net, source)
    message = only(check_text(text).problems)
    assert expected in message and "blank" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode == 0 and "Optimization Done" in result.stderr   # caffe does not notice


def test_the_pixel_sample_is_bounded(setup, monkeypatch):
    folder, net, _ = setup
    monkeypatch.setattr(data_scan, "PIXEL_SAMPLE", 4)
    scan = data_scan.scan_lmdb(net.parent / "train_lmdb")
    assert scan.count == 32 and scan.pixel_sampled == 4 and scan.pixel_max > 1 and scan.flat_records == 0


def test_a_data_layer_without_batch_size_is_an_error_and_caffe_stops(setup, caffe_install):
    folder, net, solver = setup
    text = edited(net, (f'source: "{net.parent / "train_lmdb"}" backend: LMDB batch_size: 8 }}',
                        f'source: "{net.parent / "train_lmdb"}" backend: LMDB }}'))
    message = only(check_text(text).problems)
    assert "layer data (TRAIN): data layer data has no batch_size (it has no default: 0)" in message
    assert "set batch_size in its data_param" in message
    result = train(caffe_install, folder / "tiny", text, solver.read_text())
    assert result.returncode != 0 and "Check failed: data_" in fatal_line(result)
