"""Test helpers that use the real Caffe: tiny LMDBs, random weights saved by pycaffe, caffe runs."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np

from caffetune.model import schema
from caffetune.model.caffe_tools import CaffeInstall

REPO = Path(__file__).resolve().parents[1]


def caffe_source_tree() -> Path:
    """The pinned Caffe source fetched by `make setup` (for its example models: CaffeNet, GoogLeNet, ...)."""
    lock = dict(line.split("=", 1) for line in (REPO / "proto/caffe-source.lock").read_text().splitlines()
                if line and not line.startswith("#"))
    return schema.cache_dir() / f"source-{lock['CAFFE_DEB_VERSION']}" / "src"


def write_tiny_lmdb(path: Path, count: int = 40, channels: int = 3, height: int = 8, width: int = 8,
                    classes: int = 4, seed: int = 0) -> Path:
    """A raw-Datum LMDB with random pixels; labels cycle through 0..classes-1."""
    rng = np.random.default_rng(seed)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for index in range(count):
            datum = schema.current().Datum(channels=channels, height=height, width=width, label=index % classes)
            datum.data = rng.integers(0, 256, (channels, height, width), dtype=np.uint8).tobytes()
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()
    return path


def run_pycaffe(install: CaffeInstall, code: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Python snippet that imports this build's pycaffe, in a subprocess (glog noise and crashes stay there)."""
    env = install.env()
    env.setdefault("GLOG_minloglevel", "2")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"pycaffe snippet failed:\n{result.stderr[-4000:]}")
    return result


def save_random_weights(install: CaffeInstall, net_prototxt: Path, out: Path, phase: str = "TEST") -> Path:
    """Save a randomly initialised net (its fillers) as a .caffemodel, as a stand-in for pretrained weights."""
    run_pycaffe(install, f"""
        import sys, caffe
        caffe.set_mode_cpu()
        net = caffe.Net(sys.argv[1], caffe.{phase})
        net.save(sys.argv[2])
    """, str(net_prototxt), str(out))
    return out


def caffe_train(install: CaffeInstall, solver: Path, *extra: str, cwd: Path | None = None,
                timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real `caffe train`; returns the finished process with its log in stderr."""
    env = dict(install.env(), GLOG_minloglevel="0", GLOG_logtostderr="1")
    return subprocess.run([str(install.binary), "train", f"-solver={solver}", *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY_CLASSIFIER = """name: "tiny_classifier"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "{train}" backend: LMDB batch_size: 8 } transform_param { scale: 0.00390625 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "{test}" backend: LMDB batch_size: 8 } transform_param { scale: 0.00390625 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param { num_output: {classes} weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def write_tiny_classifier(folder: Path, classes: int = 4, max_iter: int = 20, test_interval: int = 10,
                          base_lr: float = 0.01, extra_solver: str = "", count: int = 32) -> tuple[Path, Path]:
    """A tiny train_val net (conv + fc, accuracy in TEST) on two tiny LMDBs, and its solver; returns (net, solver).
    The test LMDB holds exactly test_iter * batch_size images, so every test pass sees the same images."""
    folder.mkdir(parents=True, exist_ok=True)
    train = write_tiny_lmdb(folder / "train_lmdb", count=count, classes=classes, seed=1)
    test = write_tiny_lmdb(folder / "test_lmdb", count=16, classes=classes, seed=2)
    net = folder / "train_val.prototxt"
    net.write_text(TINY_CLASSIFIER.replace("{train}", str(train)).replace("{test}", str(test))
                   .replace("{classes}", str(classes)))
    solver = folder / "solver.prototxt"
    solver.write_text(f'net: "{net}"\ntest_iter: 2\ntest_interval: {test_interval}\nbase_lr: {base_lr}\n'
                      f'lr_policy: "step" gamma: 0.5 stepsize: {max(10, max_iter // 2)}\nmomentum: 0.9\n'
                      f'display: 1\nmax_iter: {max_iter}\nsnapshot_prefix: "{folder}/snap"\nsolver_mode: CPU\n'
                      f'{extra_solver}')
    return net, solver


def smooth_image(rng, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A smooth random uint8 image (blurred colour blobs plus a little noise), like a photo rather than pure noise."""
    import cv2

    small = rng.integers(0, 256, (4, 5, channels), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).reshape(height, width, channels)
    noise = rng.integers(0, 8, image.shape, dtype=np.uint8)
    return np.minimum(image.astype(np.uint16) + noise, 255).astype(np.uint8)


def write_class_folders(root: Path, classes: int = 3, per_class: int = 4, size: tuple[int, int] = (20, 16),
                        ext: str = "png", seed: int = 0, vary_size: bool = False) -> Path:
    """root/class<k>/img<i>.<ext>: small smooth images (size is width x height), a folder per class."""
    import cv2

    rng = np.random.default_rng(seed)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = (size[0] + 3 * i, size[1] + 2 * k) if vary_size else size
            cv2.imwrite(str(folder / f"img{i}.{ext}"), smooth_image(rng, height, width))
    return root


def jpeg_with_exif(image: np.ndarray, orientation: int = 1, thumbnail: bytes = b"") -> bytes:
    """A JPEG of `image` with an EXIF APP1 segment: the orientation tag, and optional bytes (e.g. a thumbnail
    JPEG) carried inside the segment."""
    import struct

    import cv2

    encoded = cv2.imencode(".jpg", image)[1].tobytes()
    tiff = (b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation)
            + struct.pack("<I", 0) + thumbnail)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    return encoded[:2] + app1 + encoded[2:]
