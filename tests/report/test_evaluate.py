"""`caffetune eval` with pycaffe, checked against a hand computation of the same linear classifier."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.model import schema
from caffetune.report import evaluate

from helpers import run_pycaffe, write_tiny_lmdb

CLASSES, SIZE, INPUT = 6, 6, 4     # 6x6 stored images, centre-cropped to the 4x4 input
DEPLOY = f"""name: "linear"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 3 dim: {INPUT} dim: {INPUT} }} }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param {{ num_output: {CLASSES} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""
MEAN_VALUES = [104.0, 117.0, 123.0]
SCALE = 0.0078125


@pytest.fixture(scope="module")
def linear(tmp_path_factory, caffe_install):
    """A deploy net with known weights W, b, and a 30-image LMDB (labels 0..5)."""
    folder = tmp_path_factory.mktemp("eval")
    deploy = folder / "deploy.prototxt"
    deploy.write_text(DEPLOY)
    rng = np.random.default_rng(7)
    weights_matrix = rng.normal(size=(CLASSES, 3 * INPUT * INPUT)).astype(np.float32)
    bias = rng.normal(size=CLASSES).astype(np.float32)
    np.save(folder / "w.npy", weights_matrix)
    np.save(folder / "b.npy", bias)
    run_pycaffe(caffe_install, """
        import sys, numpy as np, caffe
        net = caffe.Net(sys.argv[1], caffe.TEST)
        net.params["fc"][0].data[...] = np.load(sys.argv[2])
        net.params["fc"][1].data[...] = np.load(sys.argv[3])
        net.save(sys.argv[4])
    """, str(deploy), str(folder / "w.npy"), str(folder / "b.npy"), str(folder / "linear.caffemodel"))
    db = write_tiny_lmdb(folder / "val_lmdb", count=30, height=SIZE, width=SIZE, classes=CLASSES, seed=5)
    return folder, deploy, folder / "linear.caffemodel", db, weights_matrix, bias


def _expected(db, weights_matrix, bias):
    """By hand: read the raw Datums, subtract the mean values, take the centre 4x4, scale, W x + b."""
    import lmdb

    predictions, labels, scores = [], [], []
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = schema.current().Datum.FromString(value)
            chw = np.frombuffer(datum.data, np.uint8).reshape(3, SIZE, SIZE).astype(np.float32)
            chw = (chw - np.array(MEAN_VALUES, np.float32)[:, None, None])[:, 1:5, 1:5] * SCALE
            logits = weights_matrix @ chw.ravel() + bias
            scores.append(logits)
            predictions.append(int(np.argmax(logits)))
            labels.append(datum.label)
    env.close()
    return np.array(predictions), np.array(labels), np.array(scores)


def test_eval_on_an_lmdb_matches_the_hand_computation(linear):
    folder, deploy, weights, db, weights_matrix, bias = linear
    predicted, labels, scores = _expected(db, weights_matrix, bias)
    pre = evaluate.Preprocessing(mean_values=MEAN_VALUES, scale=SCALE)
    report = evaluate.evaluate(deploy, weights, db, preprocessing=pre, batch_size=7)
    assert report.count == 30
    assert report.top1 == pytest.approx(float((predicted == labels).mean()))
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert report.k == 5 and report.top5 == pytest.approx(float((top5 == labels[:, None]).any(axis=1).mean()))
    confusion = np.zeros((CLASSES, CLASSES), int)
    for true, guess in zip(labels, predicted):
        confusion[true, guess] += 1
    np.testing.assert_array_equal(report.confusion, confusion)
    for entry in report.per_class:
        assert entry["count"] == 5 and entry["correct"] == confusion[entry["label"], entry["label"]]
    assert 0 < report.top1 < 1, "the test data must discriminate"


def test_eval_on_a_folder_of_class_folders_matches_the_lmdb(linear, tmp_path):
    folder, deploy, weights, db, *_ = linear
    from caffetune.data import lmdb_reader

    names = ["ant", "bee", "cat", "dog", "eel", "fox"]
    for index, (_key, image, label) in enumerate(lmdb_reader.iter_records(db)):
        (tmp_path / names[label]).mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / names[label] / f"{index:03d}.png"), image)
    pre = evaluate.Preprocessing(mean_values=MEAN_VALUES, scale=SCALE)
    from_db = evaluate.evaluate(deploy, weights, db, preprocessing=pre)
    from_folder = evaluate.evaluate(deploy, weights, tmp_path, preprocessing=pre)
    assert from_folder.class_names == names
    np.testing.assert_array_equal(from_folder.confusion, from_db.confusion)


def test_eval_command_prints_and_writes_the_confusion_matrix(linear, tmp_path):
    folder, deploy, weights, db, *_ = linear
    (tmp_path / "labels.txt").write_text("\n".join(f"class{i}" for i in range(CLASSES)) + "\n")
    result = CliRunner().invoke(cli, ["eval", "--model", str(deploy), "--weights", str(weights), "--data", str(db),
                                      "--mean-value", "104,117,123", "--scale", str(SCALE), "--labels",
                                      str(tmp_path / "labels.txt"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "top-1 accuracy:" in result.output and "top-5 accuracy:" in result.output
    assert "true\\pred" in result.output and "class5" in result.output
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["count"] == 30 and len(saved["confusion"]) == CLASSES
    assert (tmp_path / "out" / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_confusion_text_is_aligned():
    report = evaluate.score(np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]), np.array([0, 1, 1]), ["yes", "no"])
    assert evaluate.confusion_text(report).splitlines() == [
        "true\\pred    yes    no",
        "yes            1     0",
        "no             1     1",
    ]
    assert report.top1 == pytest.approx(2 / 3) and report.k == 2 and report.top5 == 1.0


def test_eval_subtracts_a_mean_file_before_the_centre_crop(linear):
    folder, deploy, weights, db, weights_matrix, bias = linear
    mean_image = np.arange(3 * SIZE * SIZE, dtype=np.float32).reshape(3, SIZE, SIZE)
    blob = schema.current().BlobProto()
    blob.shape.dim.extend([1, 3, SIZE, SIZE])
    blob.data.extend(mean_image.ravel().tolist())
    (folder / "mean.binaryproto").write_bytes(blob.SerializeToString())
    report = evaluate.evaluate(deploy, weights, db, preprocessing=evaluate.Preprocessing(
        mean_file=folder / "mean.binaryproto", scale=SCALE))
    import lmdb

    env = lmdb.open(str(db), readonly=True, lock=False)
    expected = []
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = schema.current().Datum.FromString(value)
            chw = np.frombuffer(datum.data, np.uint8).reshape(3, SIZE, SIZE).astype(np.float32)
            x = ((chw - mean_image)[:, 1:5, 1:5] * SCALE).ravel()
            expected.append((datum.label, int(np.argmax(weights_matrix @ x + bias))))
    env.close()
    confusion = np.zeros((CLASSES, CLASSES), int)
    for true, guess in expected:
        confusion[true, guess] += 1
    np.testing.assert_array_equal(report.confusion, confusion)


def test_shards_are_contiguous_whole_batches_covering_every_image():
    assert evaluate._shards(30, 4, 3) == [(0, 8), (8, 20), (20, 30)]
    assert evaluate._shards(30, 7, 8) == [(0, 14), (14, 30)]        # 5 batches: at least two batches a shard
    assert evaluate._shards(5, 32, 2) == [(0, 5)]


@pytest.mark.parametrize("source", ["lmdb", "folder"])
def test_scoring_in_several_processes_gives_what_one_process_gives(linear, tmp_path, source):
    folder, deploy, weights, db, *_ = linear
    data = db
    if source == "folder":
        from caffetune.data import lmdb_reader

        data = tmp_path / "images"
        for index, (_key, image, label) in enumerate(lmdb_reader.iter_records(db)):
            (data / f"class{label}").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(data / f"class{label}" / f"{index:03d}.png"), image)
    pre = evaluate.Preprocessing(mean_values=MEAN_VALUES, scale=SCALE)
    one = evaluate.evaluate(deploy, weights, data, preprocessing=pre, batch_size=4, workers=1)
    three = evaluate.evaluate(deploy, weights, data, preprocessing=pre, batch_size=4, workers=3)
    assert three.count == one.count == 30
    np.testing.assert_array_equal(three.confusion, one.confusion)
    assert (three.top1, three.top5, three.per_class) == (one.top1, one.top5, one.per_class)
