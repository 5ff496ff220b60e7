"""`--cache-crops K`: random TRAIN crops, approximated by K crops per image (each also mirrored when the TRAIN
transform mirrors). This is an approximation, and says so: Caffe takes a new random crop of every image every
epoch (crop_size x crop_size anywhere in the image); the cache holds K of them per image, drawn once, and the run's
row sequence picks one of them (and an orientation) per image per epoch at random.

The pass runs two nets: the data layer alone with crop_size cleared (Caffe's own decode, mean and scale over the
whole image; a mean file is subtracted before cropping either way, so cropping afterwards is what Caffe computes)
and the trunk behind an Input layer of the crop's shape.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from google.protobuf.message import Message

from caffetune.errors import NetError
from caffetune.model import layers as L
from caffetune.model import schema, shapes
from caffetune.surgery.net_edits import copy
from caffetune.transfer.trunk_cut import PhaseCut


def nets(net: Message, pc: PhaseCut) -> tuple[Message, Message]:
    """(the uncropped data layer alone, the trunk behind an Input layer of the crop's shape)."""
    data = copy(pc.data_layer)
    crop = data.transform_param.crop_size
    data.transform_param.ClearField("crop_size")
    data.transform_param.ClearField("mirror")
    data.ClearField("include")
    data.ClearField("exclude")
    data_net = schema.current().NetParameter(name=net.name)
    data_net.layer.append(data)
    shape = shapes.infer(data_net, phase="TEST").blobs.get(data.top[0])
    if not shape or not shapes.is_complete(shape):
        raise NetError("--cache-crops needs the stored images' size, and the TRAIN source cannot be read for it",
                       where=data.name, fix="build the TRAIN LMDB first")
    if pc.data_layer.top[0] in pc.blobs:
        raise NetError("--cache-crops: the top reads the data blob itself, so there is no trunk output to cache",
                       where=data.name, fix="run without --cache-features")
    trunk = schema.current().NetParameter(name=net.name)
    entry = trunk.layer.add(name="cropped_input", type="Input")
    entry.top.append(data.top[0])
    entry.input_param.shape.add().dim.extend([shape[0], shape[1], crop, crop])
    names = set(pc.trunk)
    for layer in L.all_layers(net):
        if layer.name in names and pc.phase in L.phases(layer):
            piece = copy(layer)
            piece.ClearField("include")
            piece.ClearField("exclude")
            trunk.layer.append(piece)
    return data_net, trunk


def job(pc: PhaseCut, data_net: Path, trunk_net: Path, weights: Path, images: int, batch: int, crops: int,
        mirror: bool, names: dict[str, str], work: Path) -> dict:
    variants = crops * (2 if mirror else 1)
    data_tops = list(pc.data_layer.top)
    return {"phase": pc.phase, "kind": "crops", "net": str(data_net), "trunk": str(trunk_net),
            "weights": str(weights), "images": images, "batch": batch, "crops": crops, "mirror": mirror,
            "crop": pc.data_layer.transform_param.crop_size, "seed": 0, "data": data_tops[0],
            "variants": variants,
            "blobs": {b: str(work / f"{pc.phase}-crops-{names[b]}.npy") for b in pc.blobs if b not in data_tops},
            "labels": {b: str(work / f"{pc.phase}-{names[b]}.npy") for b in pc.blobs if b in data_tops}}


def store(job_spec: dict, work: Path, names: dict[str, str], write_hdf5) -> list[list[str]]:
    """Each variant (crop k, orientation) as its own HDF5 files; returns the file names per variant."""
    per_variant = []
    labels = {b: np.load(path, mmap_mode="r") for b, path in job_spec["labels"].items()}
    features = {b: np.load(path, mmap_mode="r") for b, path in job_spec["blobs"].items()}
    for variant in range(job_spec["variants"]):
        arrays = labels | {b: array[variant] for b, array in features.items()}
        per_variant.append(write_hdf5(work, f"train-crop{variant}", arrays, names))
    for path in list(job_spec["labels"].values()) + list(job_spec["blobs"].values()):
        Path(path).unlink()
    return per_variant


def write_sequence(cache, out: Path, rows: int, random_seed: int | None, write_hdf5) -> Path:
    """The run's TRAIN rows: image k mod N (Caffe's order), one of its cached crops/orientations at random."""
    import h5py

    entry = cache.phase("TRAIN")
    images, variants = entry["images"], entry["crop_files"]
    seed = random_seed if random_seed is not None and random_seed >= 0 else int.from_bytes(os.urandom(4), "little")
    choice = np.random.default_rng(seed).integers(len(variants), size=rows)
    loaded = []
    for names in variants:
        parts: dict[str, list] = {}
        for name in names:
            with h5py.File(cache.folder / name, "r") as handle:
                for key in handle:
                    parts.setdefault(key, []).append(handle[key][...])
        loaded.append({key: np.concatenate(values) for key, values in parts.items()})
    order = np.arange(rows) % images
    stacked = {key: np.stack([variant[key] for variant in loaded]) for key in loaded[0]}
    sequence = {key: values[choice, order] for key, values in stacked.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_hdf5(out, "train-sequence", sequence, {key: key for key in sequence})
    return out / "train-sequence.txt"
