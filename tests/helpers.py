"""Test helpers that use the real Caffe: tiny LMDBs, random weights saved by pycaffe, caffe runs."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import numpy as np

from caffetune import schema
from caffetune.caffe_bin import CaffeInstall

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
    return subprocess.run([str(install.binary), "train", f"-solver={solver}", *extra], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
