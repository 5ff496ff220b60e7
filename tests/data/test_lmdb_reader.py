"""The one LMDB reader: first record, entry count, label names beside a database, and clear errors for paths that
are not LMDBs (what shape inference, rewrite's dataset sizes, preflight and eval share)."""
from __future__ import annotations

import pytest

from caffetune.data import lmdb_reader
from caffetune.errors import DatasetError
from caffetune.model import shapes
from caffetune.surgery import solver

from helpers import write_tiny_lmdb


def test_first_datum_and_entry_count(tmp_path):
    db = write_tiny_lmdb(tmp_path / "train_lmdb", count=6, channels=1, height=5, width=7, classes=3)
    first = lmdb_reader.first_datum(db)
    assert (first.channels, first.height, first.width, first.label) == (1, 5, 7, 0)
    assert lmdb_reader.entry_count(db) == 6 == solver.dataset_size(str(db))
    assert lmdb_reader.summarize(db).label_histogram == {0: 2, 1: 2, 2: 2}


def test_label_names_come_from_beside_the_database_or_a_file(tmp_path):
    db = write_tiny_lmdb(tmp_path / "train_lmdb", count=2)
    assert lmdb_reader.label_names(db) == []
    (tmp_path / "labels.txt").write_text("ant\nbee\n")
    assert lmdb_reader.label_names(db) == ["ant", "bee"]
    (tmp_path / "other.txt").write_text("cat\n")
    assert lmdb_reader.label_names(db, tmp_path / "other.txt") == ["cat"]


def test_paths_that_are_not_lmdbs_are_named(tmp_path):
    db = write_tiny_lmdb(tmp_path / "db", count=1)
    with pytest.raises(DatasetError, match="data.mdb file, not the database") as caught:
        lmdb_reader.first_datum(db / "data.mdb")
    assert str(db) in caught.value.fix
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no data.mdb"):
        solver.dataset_size(str(tmp_path / "empty"))


def test_shape_inference_reads_the_first_record_of_a_data_layer(tmp_path):
    from caffetune.model import prototxt

    write_tiny_lmdb(tmp_path / "train_lmdb", count=2, channels=3, height=9, width=11)
    net = prototxt.parse('layer { name: "data" type: "Data" top: "data" top: "label" '
                         'data_param { source: "train_lmdb" backend: LMDB batch_size: 4 } }')
    inferred = shapes.infer(net, "TRAIN", tmp_path)
    assert inferred.outputs["data"] == [(4, 3, 9, 11), (4,)]
    (tmp_path / "broken_lmdb").mkdir()
    broken = prototxt.parse('layer { name: "data" type: "Data" top: "data" top: "label" '
                            'data_param { source: "broken_lmdb" backend: LMDB batch_size: 4 } }')
    assert any("holds no data.mdb" in p for p in shapes.infer(broken, "TRAIN", tmp_path).problems)
