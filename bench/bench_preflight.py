"""Preflight's cost on a big LMDB: its one streaming pass (data_scan.scan_lmdb: labels, label runs, every record's
size) against the plain pass it replaces (lmdb_reader.summarize: labels only), side by side on the same database,
and the whole `preflight.check` of a net reading it (without building the net). Prints the times and the ratios.

BENCH_RECORDS (default 50000) raw 3x64x64 records are generated once into a temporary folder, plus as many encoded
JPEG records (sized from their headers, sampled: data_scan.ENCODED_SIZE_SAMPLE). Best of BENCH_ROUNDS (default 3)
warm runs, alternating the arms.
"""
from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import lmdb
import numpy as np

from caffetune.data import lmdb_reader
from caffetune.model import prototxt, schema
from caffetune.train import data_scan, preflight

RECORDS = int(os.environ.get("BENCH_RECORDS", "50000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
NET = """layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "{db}" backend: LMDB batch_size: 64 } transform_param { crop_size: 56 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def write_lmdb(path: Path, encoded: bool) -> Path:
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = cv2.imencode(".jpg", tile)[1].tobytes()
    env = lmdb.open(str(path), map_size=1 << 34)
    txn = env.begin(write=True)
    for index in range(RECORDS):
        label = int(rng.integers(0, 10))
        if encoded:
            datum = schema.current().Datum(data=jpeg, encoded=True, label=label)
        else:
            datum = schema.current().Datum(channels=3, height=64, width=64, label=label, data=tile.tobytes())
        txn.put(f"{index:08d}".encode(), datum.SerializeToString())
        if index % 5000 == 4999:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    env.close()
    return path


def best_of(function) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="caffetune-bench-preflight-") as folder:
        for encoded in (False, True):
            db = write_lmdb(Path(folder) / ("encoded" if encoded else "raw"), encoded)
            size = sum(f.stat().st_size for f in db.iterdir()) / 1e6
            net = prototxt.parse(NET.replace("{db}", str(db)))
            plain = best_of(partial(lmdb_reader.summarize, db))
            scan = best_of(partial(data_scan.scan_lmdb, db))
            check = best_of(partial(preflight.check, {"net.prototxt": net}, roles={"net.prototxt": "train_net"}))
            kind = "encoded JPEG" if encoded else "raw 3x64x64"
            print(f"{RECORDS} {kind} records ({size:.0f} MB): summarize (labels) {plain:.3f}s, "
                  f"scan_lmdb (labels, runs, sizes) {scan:.3f}s = {scan / plain:.2f}x, "
                  f"preflight.check {check:.3f}s = {check / plain:.2f}x; "
                  f"{scan / RECORDS * 1e6:.1f} us per record")


if __name__ == "__main__":
    main()
