"""The feature cache on disk: its size bound (least recently used first), the HDF5 files HDF5Data reads, the
dataset names HDF5 can carry, and the refusals of what a cache cannot reproduce."""
from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from caffetune.errors import DatasetError, RunError
from caffetune.model import prototxt, schema
from caffetune.transfer import feature_cache, mirror_replay, top_net


def fake_cache(root, name: str, size: int, used: float):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "rows.h5").write_bytes(b"x" * size)
    manifest = folder / feature_cache.MANIFEST
    manifest.write_text(json.dumps({"bytes": size}))
    os.utime(manifest, (used, used))
    return folder


def test_make_room_deletes_the_least_recently_used_caches_first(tmp_path):
    old = fake_cache(tmp_path, "old", 400, used=1000)
    recent = fake_cache(tmp_path, "recent", 400, used=2000)
    removed = feature_cache.make_room(tmp_path, needed=300, limit=1000)
    assert removed == [old] and not old.exists() and recent.exists()
    assert feature_cache.make_room(tmp_path, needed=100, limit=1000) == []


def test_a_cache_larger_than_the_bound_is_refused_before_the_pass(tmp_path):
    with pytest.raises(DatasetError, match="over the") as error:
        feature_cache.make_room(tmp_path, needed=5 << 30, limit=1 << 30)
    assert feature_cache.LIMIT_ENV in error.value.fix


def test_hdf5_files_are_split_by_size_and_listed_for_hdf5data(tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "FILE_BYTES", 10 * 8 * 4)        # 10 rows of 8 floats per file
    rows = {"pool/5": np.arange(25 * 7, dtype=np.float32).reshape(25, 7), "label": np.arange(25, dtype=np.float32)}
    names = feature_cache.dataset_names(list(rows))
    assert names == {"pool/5": "pool_5", "label": "label"}
    written = feature_cache.write_hdf5(tmp_path, "train", rows, names)
    assert written == ["train-000.h5", "train-001.h5", "train-002.h5"]
    listed = (tmp_path / "train.txt").read_text().split()
    assert listed == [str(tmp_path / name) for name in written]
    back = np.concatenate([h5py.File(path, "r")["pool_5"][...] for path in listed])
    assert (back == rows["pool/5"]).all()


def test_colliding_dataset_names_stay_distinct():
    assert feature_cache.dataset_names(["a/b", "a_b"]) == {"a/b": "a_b", "a_b": "a_b_"}


def test_mirror_sequence_rows_follow_the_transformer_draws(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    plain = {"feat": np.arange(5, dtype=np.float32)[:, None] * np.ones((5, 3), np.float32),
             "label": np.arange(5, dtype=np.float32)}
    flipped = {"feat": -plain["feat"], "label": plain["label"]}
    identity = {"feat": "feat", "label": "label"}
    manifest = {"phases": {"TRAIN": {"images": 5, "files": feature_cache.write_hdf5(folder, "train", plain, identity),
                                     "mirror_files": feature_cache.write_hdf5(folder, "train-mirror", flipped,
                                                                              identity)}}}
    cache = feature_cache.FeatureCache(folder, manifest)
    listed = mirror_replay.write_mirror_sequence(cache, tmp_path / "run", rows=12, random_seed=11)
    with h5py.File(listed.read_text().split()[0], "r") as handle:
        feat, label = handle["feat"][...], handle["label"][...]
    flips = mirror_replay.transformer_draws(11, 12) % 2 == 1
    assert (label == np.arange(12) % 5).all()                          # record k mod N, wrapping as Caffe does
    assert (feat[:, 0] == np.where(flips, -1, 1) * (np.arange(12) % 5)).all()
    assert 0 < flips.sum() < 12


def test_the_top_solver_keeps_the_schedule_and_refuses_split_nets(tmp_path):
    solver = prototxt.parse('net: "tv.prototxt" base_lr: 0.01 lr_policy: "step" stepsize: 7 max_iter: 30 '
                            'test_interval: 10 test_iter: 2 snapshot: 10 random_seed: 3', "SolverParameter")
    top = top_net.top_solver(solver, tmp_path / "top.prototxt")
    assert top.net == str(tmp_path / "top.prototxt") and solver.net == "tv.prototxt"     # the input is not mutated
    assert (top.max_iter, top.stepsize, top.test_interval, top.snapshot, top.random_seed) == (30, 7, 10, 10, 3)
    split = schema.current().SolverParameter(train_net="train.prototxt")
    split.test_net.append("test.prototxt")
    with pytest.raises(RunError, match="one file"):
        top_net.top_solver(split, tmp_path / "top.prototxt")


SHARDED_NET = """name: "sharded"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "{train}" backend: LMDB batch_size: 5 } transform_param { scale: 0.00390625 mirror: true } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "{test}" backend: LMDB batch_size: 5 } transform_param { scale: 0.00390625 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" param { lr_mult: 0 } param { lr_mult: 0 }
  convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc_new" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def cached_rows(cache) -> dict:
    rows = {}
    for phase, entry in cache.manifest["phases"].items():
        for key in ("files", "mirror_files"):
            for name in entry.get(key, []):
                with h5py.File(cache.folder / name) as handle:
                    rows.update({(phase, key, name, d): handle[d][()] for d in handle})
    return rows


def test_the_pass_split_over_processes_writes_the_rows_one_process_writes(tmp_path, caffe_install, monkeypatch):
    """TRAIN: 37 images in batches of 5 = 8 batches over 3 processes (3 steps are skipped by the last one; its
    last batch holds 2 images), mirrored; TEST: 8 images = 2 batches, so one process has none."""
    from caffetune.transfer import trunk_cut

    from helpers import save_random_weights, write_tiny_lmdb

    train = write_tiny_lmdb(tmp_path / "train_lmdb", count=37, seed=1)
    test = write_tiny_lmdb(tmp_path / "test_lmdb", count=8, seed=2)
    path = tmp_path / "train_val.prototxt"
    path.write_text(SHARDED_NET.replace("{train}", str(train)).replace("{test}", str(test)))
    weights = save_random_weights(caffe_install, path, tmp_path / "w.caffemodel", phase="TRAIN")
    net = prototxt.parse(path.read_text(), path=str(path))
    cut = trunk_cut.find_cut(net)
    results = {}
    for workers in (1, 3):
        monkeypatch.setenv(feature_cache.WORKERS_ENV, str(workers))
        seen = []
        cache = feature_cache.build(net, cut, weights, caffe_install, root=tmp_path / f"cache{workers}",
                                    progress=seen.append)
        assert seen[-1].done == seen[-1].total and {p.total for p in seen if p.phase == "TRAIN"} == {8}
        assert not list(cache.folder.glob("*.npy")) and not list(cache.folder.glob("*.err"))
        results[workers] = cached_rows(cache)
    assert results[1].keys() == results[3].keys() and len(results[1]) >= 6     # data/label/pool1, mirror too
    for key, rows in results[1].items():
        assert rows.tobytes() == results[3][key].tobytes() and rows.shape == results[3][key].shape, key
    assert len(results[3][("TRAIN", "files", "train-000.h5", "label")]) == 37


def test_a_failing_pass_process_stops_the_others_and_says_why(tmp_path, caffe_install, monkeypatch):
    """The second of two processes cannot write its shard (a folder is in the way): NetError with its last words."""
    from caffetune.errors import NetError
    from caffetune.transfer import pass_workers

    from helpers import save_random_weights, write_tiny_lmdb

    source = write_tiny_lmdb(tmp_path / "lmdb", count=20, seed=1)
    net = tmp_path / "trunk.prototxt"
    net.write_text(f'layer {{ name: "data" type: "Data" top: "data" top: "label" data_param {{ source: "{source}" '
                   'backend: LMDB batch_size: 5 } }\n'
                   'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
                   'convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "xavier" } } }\n')
    weights = save_random_weights(caffe_install, net, tmp_path / "w.caffemodel")
    out = tmp_path / "conv1.npy"
    os.mkdir(f"{out}.shard1.npy")
    job = {"phase": "TEST", "net": str(net), "weights": str(weights), "images": 20, "batch": 5,
           "blobs": {"conv1": str(out)}, "mirror": {}, "flip": "data"}
    monkeypatch.setenv(pass_workers.WORKERS_ENV, "2")
    with pytest.raises(NetError, match="failed in Caffe: .*shard1"):
        pass_workers.run_pass(caffe_install, [job], tmp_path, lambda item: None)
