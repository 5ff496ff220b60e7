"""Image lists (class folders, Caffe list files, CSV), label checks and the stratified seeded split."""
from __future__ import annotations

from collections import Counter

import pytest

from caffetune.data import imagelist
from caffetune.data.imagelist import Record
from caffetune.errors import DatasetError


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_class_folders_give_sorted_labels_and_relative_paths(tmp_path):
    for name in ("dog/b.jpg", "dog/a.jpg", "cat/x.png", "cat/sub/y.png", "cat/.hidden.jpg", ".git/z", "notes.txt"):
        _touch(tmp_path / name)
    (tmp_path / "empty").mkdir()
    listed = imagelist.from_folder(tmp_path)
    assert listed.label_names == ["cat", "dog"]
    assert listed.records == [Record("cat/sub/y.png", 0), Record("cat/x.png", 0), Record("dog/a.jpg", 1),
                              Record("dog/b.jpg", 1)]
    assert ("notes.txt", "not inside a class folder") in listed.ignored
    assert ("empty/", "empty class folder: not used as a class") in listed.ignored


def test_list_file_splits_at_the_last_space_like_convert_imageset(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("my photos/a b.jpg 2\r\n\nc.jpg\t0\nd.jpg 1\n")
    listed = imagelist.from_list_file(listing, tmp_path)
    assert listed.records == [Record("my photos/a b.jpg", 2), Record("c.jpg", 0), Record("d.jpg", 1)]
    assert listed.label_names == ["0", "1", "2"]


def test_list_file_errors_name_the_line(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("a.jpg 0\nb.jpg cat\n")
    with pytest.raises(DatasetError) as caught:
        imagelist.from_list_file(listing, tmp_path)
    assert caught.value.where == f"{listing}:2"
    assert "not an integer" in caught.value.what
    with pytest.raises(DatasetError, match="root folder not found"):
        imagelist.from_list_file(listing, tmp_path / "missing")


def test_csv_with_header_and_class_names(tmp_path):
    table = tmp_path / "data.csv"
    table.write_text("label,filename\nzebra,z1.jpg\nant,a1.jpg\nzebra,\"z 2.jpg\"\n")
    listed = imagelist.from_csv(table)
    assert listed.label_names == ["ant", "zebra"]
    assert listed.records == [Record("z1.jpg", 1), Record("a1.jpg", 0), Record("z 2.jpg", 1)]


def test_csv_without_header_and_integer_labels(tmp_path):
    table = tmp_path / "data.csv"
    table.write_text("a.jpg,1\nb.jpg,0\n")
    assert imagelist.load(table).records == [Record("a.jpg", 1), Record("b.jpg", 0)]


def test_labels_above_zero_are_refused_with_the_remap_offered():
    listed = imagelist.ImageList(root=None, records=[Record("a", 1), Record("b", 2), Record("c", 5)],
                                 label_names=["1", "2", "5"], source="list t.txt")
    with pytest.raises(DatasetError) as caught:
        imagelist.check_labels(listed)
    assert "labels start at 1" in caught.value.what
    assert "--remap-labels" in caught.value.fix and "1->0, 2->1, 5->2" in caught.value.fix
    remapped = imagelist.check_labels(listed, remap=True)
    assert [r.label for r in remapped.records] == [0, 1, 2]
    assert remapped.label_names == ["1", "2", "5"]
    assert listed.records[0].label == 1, "the caller's list is not changed"


def test_gaps_in_labels_are_refused():
    listed = imagelist.ImageList(root=None, records=[Record("a", 0), Record("b", 2)], label_names=[], source="s")
    with pytest.raises(DatasetError, match=r"not contiguous \(missing \[1\]\)"):
        imagelist.check_labels(listed)


def test_split_is_stratified_seeded_and_disjoint():
    records = [Record(f"c{label}/{i}.jpg", label) for label, size in enumerate((10, 20, 3, 1)) for i in range(size)]
    train, val = imagelist.split(records, 0.2, seed=7)
    assert Counter(r.label for r in val) == {0: 2, 1: 4, 2: 1}         # a class of one stays in train
    assert sorted(train + val, key=lambda r: r.path) == sorted(records, key=lambda r: r.path)
    assert imagelist.split(list(reversed(records)), 0.2, seed=7) == (train, val), "input order does not matter"
    assert imagelist.split(records, 0.2, seed=8) != (train, val)


def test_shuffle_is_seeded():
    records = [Record(str(i), 0) for i in range(50)]
    assert imagelist.shuffled(records, 3) == imagelist.shuffled(records, 3) != records


def test_load_needs_exactly_one_input(tmp_path):
    with pytest.raises(DatasetError, match="exactly one input"):
        imagelist.load(tmp_path, list_file=tmp_path / "x.txt")
    with pytest.raises(DatasetError, match="input not found"):
        imagelist.load(tmp_path / "nope")
