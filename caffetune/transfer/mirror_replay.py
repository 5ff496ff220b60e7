"""`mirror: true` replayed from a cache of both orientations: the TRAIN rows in the order and orientation in which
Caffe's data layer produces them.

Caffe seeds the TRAIN data layer's DataTransformer with a draw of its global generator (boost::mt19937 seeded with
the solver's random_seed). BaseDataLayer::LayerSetUp and BasePrefetchingDataLayer::LayerSetUp both call InitRand,
so the second draw is the seed that stays (the data layer is the first layer set up; nothing draws before it).
The transformer flips image k when its mirror draw is odd (`Rand(2)` is `draw % 2`, data_transformer.cpp; with
crop_size in TRAIN two offset draws follow it, Rand(1) when the crop is the image's size), and the Data layer
reads record k mod N. numpy's MT19937 with the classic init_genrand seeding is the same generator.
With random_seed set, the flips are Caffe's own; without it Caffe's differ from run to run, and so do these.
A resumed Caffe run builds its data layer again (first record, same seed); the sequence restarts the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from caffetune.transfer.feature_cache import FeatureCache, write_hdf5


def transformer_draws(random_seed: int | None, count: int) -> np.ndarray:
    """The TRAIN transformer's first `count` raw mt19937 draws, as `caffe train` makes them (see the module doc)."""
    if random_seed is None or random_seed < 0:
        seed = int.from_bytes(os.urandom(4), "little")
    else:
        global_rng = np.random.MT19937()
        global_rng._legacy_seeding(random_seed & 0xFFFFFFFF)    # boost::mt19937(seed): the classic init_genrand
        seed = int(global_rng.random_raw(2)[1])                  # InitRand twice: the second draw is kept
    rng = np.random.MT19937()
    rng._legacy_seeding(seed)
    return rng.random_raw(count)


def write_mirror_sequence(cache: FeatureCache, out: Path, rows: int, random_seed: int | None,
                          draws_per_image: int = 1) -> Path:
    """HDF5 files of the first `rows` TRAIN rows Caffe reads: image k mod N, flipped when the first of its draws is
    odd (mirror draws before the crop offsets: data_transformer.cpp); returns the list file for HDF5Data."""
    import h5py

    entry = cache.phase("TRAIN")
    images = entry["images"]
    draws = transformer_draws(random_seed, rows * draws_per_image)[::draws_per_image]
    flips = (draws % 2).astype(bool)
    plain = _open_rows(h5py, cache.folder, entry["files"])
    mirrored = _open_rows(h5py, cache.folder, entry["mirror_files"])
    out.mkdir(parents=True, exist_ok=True)
    sequence = {}
    order = np.arange(rows) % images
    for name in plain:
        sequence[name] = np.where(flips.reshape((-1,) + (1,) * (plain[name].ndim - 1)), mirrored[name][order],
                                  plain[name][order])
    identity = {name: name for name in sequence}
    write_hdf5(out, "train-sequence", sequence, identity)
    return out / "train-sequence.txt"


def _open_rows(h5py, folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for name in names:
        with h5py.File(folder / name, "r") as handle:
            for key in handle:
                parts.setdefault(key, []).append(handle[key][...])
    return {key: np.concatenate(values) for key, values in parts.items()}


def sequence_rows(solver: Message, batch: int) -> int:
    return max(solver.max_iter, 1) * batch * max(solver.iter_size, 1)
