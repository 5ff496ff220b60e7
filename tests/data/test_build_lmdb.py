"""Build-lmdb / inspect-lmdb without the Caffe tools: layout, reproducibility, skipped files, unusual
images, resize modes, encoded Datums, map growth, atomic output, the reader's errors and the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.data import dataset, datum, imagelist, lmdb_reader, mean
from caffetune.data.dataset import BuildOptions
from caffetune.data.datum import ImageOptions
from caffetune.data.lmdb_writer import LmdbWriter, make_key
from caffetune.errors import DatasetError

from helpers import smooth_image, write_class_folders

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "build_lmdb"


def _build(source, out, **options):
    image = {k: options.pop(k) for k in list(options) if k in ImageOptions.__dataclass_fields__}
    return dataset.build(imagelist.load(source), out, BuildOptions(image=ImageOptions(**image), workers=1, **options))


def _records(db):
    return [(key, image, label) for key, image, label in lmdb_reader.iter_records(db)]


def test_dataset_folder_layout_lists_and_keys(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=3, per_class=5)
    summary = _build(source, tmp_path / "ds", val_fraction=0.2, resize=(12, 10))
    out = tmp_path / "ds"
    assert sorted(p.name for p in out.iterdir()) == ["labels.txt", "mean.binaryproto", "mean.json", "summary.json",
                                                     "train.txt", "train_lmdb", "val.txt", "val_lmdb"]
    assert (out / "labels.txt").read_text() == "class0\nclass1\nclass2\n"
    for split, count in (("train", 12), ("val", 3)):
        listed = [imagelist.parse_list_line(line, "") for line in (out / f"{split}.txt").read_text().splitlines()]
        records = _records(out / f"{split}_lmdb")
        assert len(records) == count
        # Keys as convert_imageset writes them for this very list file: %08d_<relpath>, in list order.
        assert [key for key, _, _ in records] == [f"{i:08d}_{r.path}" for i, r in enumerate(listed)]
        assert [label for _, _, label in records] == [r.label for r in listed]
        assert all(image.shape == (10, 12, 3) for _, image, _ in records)
    written = json.loads((out / "summary.json").read_text())
    assert written["splits"]["val"]["per_class"] == {"class0": 1, "class1": 1, "class2": 1}
    assert written["shape"] == [3, 10, 12] and written["images"] == 15 == summary.images
    assert written["skipped"]["count"] == 0
    assert not list(tmp_path.glob(".ds.*")), "no temporary folder is left beside the output"


def test_same_seed_same_bytes_other_seed_other_order(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=6)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        _build(source, tmp_path / name, seed=seed, val_fraction=0.25, resize=(8, 8))

    def content(name):
        env = lmdb.open(str(tmp_path / name / "train_lmdb"), readonly=True, lock=False)
        with env.begin() as txn:
            items = list(txn.cursor())
        env.close()
        return items, (tmp_path / name / "val.txt").read_text()
    assert content("a") == content("b")
    assert content("a")[0] != content("c")[0]


def test_bad_files_are_skipped_and_reported(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=3, ext="jpg")
    good_jpeg = (source / "class0" / "img0.jpg").read_bytes()
    good_png = cv2.imencode(".png", smooth_image(np.random.default_rng(0), 8, 8))[1].tobytes()
    (source / "class0" / "empty.jpg").write_bytes(b"")
    (source / "class0" / "cut.jpg").write_bytes(good_jpeg[: len(good_jpeg) * 2 // 3])
    (source / "class1" / "cut.png").write_bytes(good_png[:-20])
    (source / "class1" / "notes.txt").write_text("not an image")
    summary = _build(source, tmp_path / "ds")
    report = (tmp_path / "ds" / "skipped.tsv").read_text().splitlines()
    assert report[0] == "path\treason"
    assert sorted(report[1:]) == ["class0/cut.jpg\ttruncated JPEG (no end-of-image marker)",
                                  "class0/empty.jpg\tempty file", "class1/cut.png\ttruncated PNG (no IEND chunk)",
                                  "class1/notes.txt\tnot an image OpenCV can decode"]
    assert summary.images == 6
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["skipped"]["count"] == 4
    assert lmdb_reader.summarize(tmp_path / "ds" / "train_lmdb").count == 6


def test_missing_files_in_a_list_are_skipped_and_strict_fails(tmp_path):
    write_class_folders(tmp_path / "src", classes=2, per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text("class0/img0.png 0\nclass0/gone.png 0\nclass1/img0.png 1\n")
    summary = dataset.build(imagelist.from_list_file(listing, tmp_path / "src"), tmp_path / "ds",
                            BuildOptions(workers=1, shuffle=False))
    assert summary.skipped == [("class0/gone.png", "file not found")]
    assert (tmp_path / "ds" / "train.txt").read_text() == "class0/img0.png 0\nclass1/img0.png 1\n"
    with pytest.raises(DatasetError) as caught:
        dataset.build(imagelist.from_list_file(listing, tmp_path / "src"), tmp_path / "strict",
                      BuildOptions(workers=1, strict=True))
    assert caught.value.where.endswith("class0/gone.png") and "file not found" in caught.value.what
    assert not (tmp_path / "strict").exists()
    assert not list(tmp_path.glob(".strict.*"))


def test_labels_not_starting_at_zero_are_refused_unless_remapped(tmp_path):
    write_class_folders(tmp_path / "src", classes=2, per_class=2)
    listing = tmp_path / "list.txt"
    listing.write_text("class0/img0.png 3\nclass0/img1.png 3\nclass1/img0.png 7\n")
    with pytest.raises(DatasetError, match="labels start at 3"):
        dataset.build(imagelist.from_list_file(listing, tmp_path / "src"), tmp_path / "ds", BuildOptions(workers=1))
    assert not (tmp_path / "ds").exists()
    dataset.build(imagelist.from_list_file(listing, tmp_path / "src"), tmp_path / "ds",
                  BuildOptions(workers=1, remap_labels=True, shuffle=False))
    assert (tmp_path / "ds" / "labels.txt").read_text() == "3\n7\n"
    assert lmdb_reader.summarize(tmp_path / "ds" / "train_lmdb").label_histogram == {0: 2, 1: 1}


def test_existing_output_needs_overwrite(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=2)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="already exists"):
        _build(source, tmp_path / "ds")
    assert (tmp_path / "ds" / "keep.txt").read_text() == "mine"
    _build(source, tmp_path / "ds", overwrite=True)
    assert not (tmp_path / "ds" / "keep.txt").exists() and (tmp_path / "ds" / "train_lmdb").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_mean_is_the_pixel_mean_and_per_channel_values(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=3, size=(6, 5))
    summary = _build(source, tmp_path / "ds")
    images = np.stack([image for _, image, _ in _records(tmp_path / "ds" / "train_lmdb")]).astype(np.float64)
    expected = images.mean(axis=0).transpose(2, 0, 1)
    stored = mean.load(tmp_path / "ds" / "mean.binaryproto")
    assert stored.shape == (3, 5, 6)
    np.testing.assert_allclose(stored, expected, atol=1e-4)
    np.testing.assert_allclose(summary.mean_value, expected.reshape(3, -1).mean(axis=1), atol=1e-4)
    values = json.loads((tmp_path / "ds" / "mean.json").read_text())
    assert values["channels"] == "BGR" and len(values["mean_value"]) == 3


def test_mean_covers_train_only_and_varying_sizes_have_no_mean(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=3, vary_size=True)
    summary = _build(source, tmp_path / "ds")
    assert summary.mean_value is None and "different sizes" in summary.mean_problem
    assert not (tmp_path / "ds" / "mean.binaryproto").exists()
    assert summary.shape is None


def test_gray_stores_one_channel_like_imread_grayscale(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=2)
    _build(source, tmp_path / "ds", gray=True, shuffle=False)
    (key, image, _), *_ = _records(tmp_path / "ds" / "train_lmdb")
    expected = cv2.imread(str(source / key.split("_", 1)[1]), cv2.IMREAD_GRAYSCALE)
    assert image.shape == expected.shape + (1,)
    assert np.array_equal(image[:, :, 0], expected)
    assert mean.load(tmp_path / "ds" / "mean.binaryproto").shape[0] == 1


def test_alpha_16bit_and_cmyk_are_converted_deliberately(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 2] = 200                       # red, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    alpha_png = cv2.imencode(".png", rgba)[1].tobytes()
    white = datum.decode(alpha_png, ImageOptions())
    assert white.conversions == ["alpha"]
    assert white.image[0, 0].tolist() == [255, 255, 255] and white.image[0, 3].tolist() == [0, 0, 200]
    assert datum.decode(alpha_png, ImageOptions(alpha="black")).image[0, 0].tolist() == [0, 0, 0]
    assert datum.decode(alpha_png, ImageOptions(alpha="drop")).image[0, 0].tolist() == [0, 0, 200]

    deep = np.full((3, 3, 3), 65535, np.uint16)
    deep[0, 0] = (0, 32896, 257)
    converted = datum.decode(cv2.imencode(".png", deep)[1].tobytes(), ImageOptions())
    assert converted.conversions == ["16-bit"] and converted.image.dtype == np.uint8
    assert converted.image[0, 0].tolist() == [0, 128, 1] and converted.image[1, 1].tolist() == [255] * 3

    from PIL import Image  # matplotlib's dependency; it writes real CMYK JPEGs
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    cmyk = (tmp_path / "cmyk.jpg").read_bytes()
    decoded = datum.decode(cmyk, ImageOptions())
    assert decoded.conversions == ["cmyk"] and decoded.image.shape == (6, 8, 3)
    assert decoded.image[0, 0, 2] > 200 and decoded.image[0, 0, :2].max() < 50          # red stays red
    # Converted images are never stored as their original bytes: Caffe's decoder would not convert them the same way.
    stored = datum.convert("cmyk.jpg", cmyk, 0, ImageOptions(encoded="auto"))
    assert lmdb_reader.parse_datum(stored.datum, "").data != cmyk


def test_resize_modes(tmp_path):
    image = smooth_image(np.random.default_rng(1), 20, 40)                 # 40 wide, 20 high
    assert np.array_equal(datum.resize(image, (10, 10)), cv2.resize(image, (10, 10), interpolation=cv2.INTER_LINEAR))
    cropped = datum.resize(image, (10, 10), "crop")
    assert cropped.shape == (10, 10, 3)
    assert np.array_equal(cropped, cv2.resize(image, (20, 10), interpolation=cv2.INTER_LINEAR)[:, 5:15])
    padded = datum.resize(image, (10, 10), "pad")
    assert padded.shape == (10, 10, 3)
    assert padded[:2].max() == 0 and padded[-3:].max() == 0                # fitted 10x5, padded black above, below
    assert np.array_equal(padded[2:7], cv2.resize(image, (10, 5), interpolation=cv2.INTER_LINEAR))


def test_encoded_keeps_original_bytes_unless_resized(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=2, ext="jpg")
    _build(source, tmp_path / "enc", encoded="auto", shuffle=False)
    env = lmdb.open(str(tmp_path / "enc" / "train_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        for key, value in txn.cursor():
            stored = lmdb_reader.parse_datum(value, "")
            assert stored.encoded and stored.data == (source / key.decode().split("_", 1)[1]).read_bytes()
    env.close()
    summary = lmdb_reader.summarize(tmp_path / "enc" / "train_lmdb")
    assert summary.encoded and summary.shape == (3, 16, 20)

    _build(source, tmp_path / "png", encoded="png", resize=(8, 6), shuffle=False)
    _build(source, tmp_path / "raw", resize=(8, 6), shuffle=False)
    for (_, png, _), (_, raw, _) in zip(_records(tmp_path / "png" / "train_lmdb"),
                                        _records(tmp_path / "raw" / "train_lmdb")):
        assert np.array_equal(png, raw), "PNG is lossless: decoded pixels equal the raw Datum's"
    np.testing.assert_allclose(mean.load(tmp_path / "png" / "mean.binaryproto"),
                               mean.load(tmp_path / "raw" / "mean.binaryproto"))


def test_worker_processes_give_the_same_database(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=3, per_class=12)
    one = dataset.build(imagelist.load(source), tmp_path / "one", BuildOptions(workers=1))
    two = dataset.build(imagelist.load(source), tmp_path / "two", BuildOptions(workers=2))
    assert [(k, i.tobytes(), label) for k, i, label in _records(tmp_path / "one" / "train_lmdb")] == \
           [(k, i.tobytes(), label) for k, i, label in _records(tmp_path / "two" / "train_lmdb")]
    assert one.mean_value == two.mean_value


def test_writer_grows_the_map_instead_of_failing(tmp_path):
    with LmdbWriter(tmp_path / "db", map_size=64 << 10, batch_records=7) as db:
        for index in range(60):
            db.put(make_key(index, f"x{index}.png"), bytes(5000))
    assert db.map_growths > 0 and db.count == 60
    assert lmdb_reader.check_db_path(tmp_path / "db")
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    assert env.stat()["entries"] == 60
    env.close()


def test_writer_leaves_nothing_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with LmdbWriter(tmp_path / "db") as db:
            db.put(b"00000000_a", b"x")
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_long_keys_are_cut_to_lmdb_limit():
    assert len(make_key(3, "d/" * 400)) == 511 and make_key(3, "a.jpg") == b"00000003_a.jpg"


def test_reader_errors_say_what_and_where(tmp_path):
    with pytest.raises(DatasetError, match="LMDB not found"):
        lmdb_reader.summarize(tmp_path / "nope")
    source = write_class_folders(tmp_path / "src", classes=2, per_class=1)
    _build(source, tmp_path / "ds")
    with pytest.raises(DatasetError) as caught:
        lmdb_reader.summarize(tmp_path / "ds" / "train_lmdb" / "data.mdb")
    assert caught.value.fix == f"pass the folder that contains it: {tmp_path / 'ds' / 'train_lmdb'}"
    with pytest.raises(DatasetError, match="holds no data.mdb"):
        list(lmdb_reader.iter_records(tmp_path / "ds"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "data.mdb").write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError, match="not a readable LMDB"):
        lmdb_reader.summarize(tmp_path / "junk")


def test_inspect_lmdb_cli_golden(tmp_path, monkeypatch):
    source = write_class_folders(tmp_path / "src", classes=3, per_class=3, size=(7, 5))
    monkeypatch.chdir(tmp_path)
    built = CliRunner().invoke(cli, ["build-lmdb", "src", "-o", "ds", "--val-fraction", "0.34", "--json"])
    assert built.exit_code == 0, built.output
    result = CliRunner().invoke(cli, ["inspect-lmdb", "ds/train_lmdb", "--export", "samples", "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert result.output == (GOLDEN / "inspect.expected").read_text()
    key, image, label = next(lmdb_reader.iter_records("ds/train_lmdb"))
    assert np.array_equal(cv2.imread(f"samples/000_label{label}.png"), image)
    assert image.shape == (5, 7, 3) and source.is_dir()


def test_build_lmdb_cli_errors(tmp_path):
    write_class_folders(tmp_path / "src", classes=2, per_class=1)
    result = CliRunner().invoke(cli, ["build-lmdb", str(tmp_path / "src"), "-o", str(tmp_path / "src")])
    assert result.exit_code == 1 and "already exists" in str(result.exception)
    result = CliRunner().invoke(cli, ["build-lmdb", str(tmp_path / "src"), "-o", str(tmp_path / "o"),
                                      "--resize", "big"])
    assert result.exit_code == 2 and "WxH" in result.output


def _start_build(tmp_path, out, workers=1):
    return subprocess.Popen([sys.executable, "-m", "caffetune", "build-lmdb", "--list", str(tmp_path / "list.txt"),
                             "--root", str(tmp_path / "src"), "-o", str(out), "--no-shuffle", "--workers",
                             str(workers)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _all_gone(pids: list[int], timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in pids):
            return True
        time.sleep(0.05)
    return False


def _wait_for_partial_database(folder: Path, out: Path, process) -> Path:
    deadline = time.time() + 60
    while time.time() < deadline and process.poll() is None:
        building = list(folder.glob(f".{out.name}.building-*/.train_lmdb.building-*/data.mdb"))
        if building:
            return building[0]
        time.sleep(0.02)
    raise AssertionError(f"the build never started writing: {process.communicate()}")


@pytest.mark.parametrize("how, workers", [(signal.SIGKILL, 1), (signal.SIGTERM, 1), (signal.SIGKILL, 2),
                                          (signal.SIGTERM, 2)], ids=["SIGKILL", "SIGTERM", "SIGKILL-2", "SIGTERM-2"])
def test_a_killed_build_leaves_nothing_at_the_target(tmp_path, how, workers):
    write_class_folders(tmp_path / "src", classes=2, per_class=20)
    # A FIFO in the list blocks the build mid-way (reading it waits for a writer), so the kill lands mid-write.
    os.mkfifo(tmp_path / "src" / "class1" / "blocked.png")
    lines = [f"class0/img{i}.png 0" for i in range(20)] + ["class1/blocked.png 1"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    process = _start_build(tmp_path, out, workers)
    _wait_for_partial_database(tmp_path, out, process)
    workers_started = _children(process.pid)
    assert len(workers_started) >= (2 if workers == 2 else 0)
    os.kill(process.pid, how)
    process.wait(timeout=30)
    assert not out.exists(), "a killed build leaves nothing at the target path"
    assert _all_gone(workers_started), "its worker processes die with it"
    leftovers = list(tmp_path.glob(".ds.*"))
    if how == signal.SIGTERM:
        assert process.returncode == 143 and leftovers == [], "SIGTERM unwinds and removes the temporary folder"
    (tmp_path / "src" / "class1" / "blocked.png").unlink()
    (tmp_path / "list.txt").write_text("\n".join(lines[:-1]) + "\n")
    again = _start_build(tmp_path, out)
    assert again.wait(timeout=120) == 0, again.communicate()
    assert lmdb_reader.summarize(out / "train_lmdb").count == 20
    assert list(tmp_path.glob(".ds.*")) == [], "the next build removes a killed build's leftovers"


def test_warnings_for_what_builds_but_will_not_train(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=1)
    summary = _build(source, tmp_path / "ds", val_fraction=0.5)
    assert any(w.startswith("val_lmdb is empty") for w in summary.warnings)
    written = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert written["warnings"] == summary.warnings


def test_truncation_is_judged_on_the_main_image_not_a_thumbnail_or_trailing_bytes():
    from helpers import jpeg_with_exif

    image = smooth_image(np.random.default_rng(2), 30, 40)
    thumbnail = cv2.imencode(".jpg", image[:8, :8])[1].tobytes()          # ends with its own FFD9 marker
    whole = jpeg_with_exif(image, thumbnail=thumbnail)
    assert datum.decode(whole + b"camera maker data" * 10, ImageOptions()).image.shape == (30, 40, 3)
    with pytest.raises(datum.UnreadableImage, match="truncated JPEG"):
        datum.decode(whole[:-300], ImageOptions())
    rotated = datum.decode(jpeg_with_exif(image, orientation=6), ImageOptions())
    assert rotated.image.shape == (40, 30, 3), "EXIF orientation is applied, as Caffe's cv::imread does"


def test_encoded_original_bytes_only_when_caffe_would_decode_the_same_channels():
    colour = smooth_image(np.random.default_rng(3), 6, 8)
    grey_jpeg = cv2.imencode(".jpg", colour[:, :, 0])[1].tobytes()
    colour_jpeg = cv2.imencode(".jpg", colour)[1].tobytes()
    kept = datum.convert("g.jpg", grey_jpeg, 0, ImageOptions(encoded="auto", gray=True))
    assert lmdb_reader.parse_datum(kept.datum, "").data == grey_jpeg
    as_colour = lmdb_reader.parse_datum(datum.convert("g.jpg", grey_jpeg, 0, ImageOptions(encoded="auto")).datum, "")
    assert as_colour.data != grey_jpeg and datum.datum_to_image(as_colour).shape == (6, 8, 3)
    as_grey = lmdb_reader.parse_datum(datum.convert("c.jpg", colour_jpeg, 0, ImageOptions(encoded="auto",
                                                                                          gray=True)).datum, "")
    assert datum.datum_to_image(as_grey).shape == (6, 8, 1)


@pytest.mark.parametrize("label", [0, 1, 300, 2**31 - 1, -1])
def test_label_is_read_from_the_wire_format(label):
    raw = datum.raw_datum(np.zeros((4, 5, 3), np.uint8), label).SerializeToString()
    assert lmdb_reader.label_of(memoryview(raw)) == label
    assert lmdb_reader.label_of(memoryview(datum.encoded_datum(b"jpeg" * 50, label).SerializeToString())) == label


def test_summarize_refuses_records_that_are_not_datums(tmp_path):
    env = lmdb.open(str(tmp_path / "db"))
    with env.begin(write=True) as txn:
        txn.put(b"0", datum.raw_datum(np.zeros((2, 2, 3), np.uint8), 0).SerializeToString())
        txn.put(b"1", b"\xff\xff\xff")
    env.close()
    with pytest.raises(DatasetError, match="not a Caffe Datum"):
        lmdb_reader.summarize(tmp_path / "db")


def _payload_task(index: int, size: int):
    if index < 0:
        os._exit(3)                                  # a worker dying in native code looks like this
    return [bytes([index % 256]) * size, None], index


def test_shared_pool_keeps_order_and_falls_back_to_the_pipe_for_big_payloads():
    from caffetune.data.worker_pool import OrderedPool

    pool = OrderedPool(2, window=3, slot_bytes=4096)
    try:
        results = list(pool.map(_payload_task, [(i, 3000 if i % 2 else 9000) for i in range(10)]))
    finally:
        pool.close()
    assert [rest for _, rest in results] == list(range(10))
    assert all(payloads[0] == bytes([i]) * (3000 if i % 2 else 9000) and payloads[1] is None
               for i, (payloads, _) in enumerate(results))


def test_shared_pool_reports_a_dead_worker_instead_of_hanging():
    from caffetune.data.worker_pool import OrderedPool, WorkerDied

    pool = OrderedPool(2)
    try:
        with pytest.raises(WorkerDied) as caught:
            list(pool.map(_payload_task, [(1, 10), (-1, 10), (2, 10)]))
        # The pool breaks as a whole: the task named is the dead one or one that was still in flight with it.
        assert caught.value.task in ((1, 10), (-1, 10))
    finally:
        pool.close(kill=True)


def test_build_lmdb_cli_from_csv_with_class_names_json_summary(tmp_path):
    write_class_folders(tmp_path / "src", classes=2, per_class=3, size=(9, 7))
    table = tmp_path / "data.csv"
    table.write_text("path,label\n" + "".join(f"class{k}/img{i}.png,{'cat' if k else 'dog'}\n"
                                              for k in range(2) for i in range(3)))
    result = CliRunner().invoke(cli, ["build-lmdb", "--csv", str(table), "--root", str(tmp_path / "src"), "-o",
                                      str(tmp_path / "ds"), "--resize", "8", "--encoded", "png", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["labels"] == ["cat", "dog"] and summary["shape"] == [3, 8, 8]
    assert summary["splits"]["train"]["per_class"] == {"cat": 3, "dog": 3}
    assert summary["options"]["image"]["encoded"] == "png" and summary["images_per_second"] > 0
    assert lmdb_reader.summarize(tmp_path / "ds" / "train_lmdb").encoded
    assert (tmp_path / "ds" / "labels.txt").read_text() == "cat\ndog\n"


def test_a_list_with_the_wrong_root_fails_with_the_reason(tmp_path):
    write_class_folders(tmp_path / "src", classes=2, per_class=9)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"class{k}/img{i}.png {k}\n" for k in range(2) for i in range(9)))
    with pytest.raises(DatasetError) as caught:      # 18 images: two chunks, so two worker processes
        dataset.build(imagelist.from_list_file(listing), tmp_path / "ds", BuildOptions(workers=2))
    assert "file not found" in caught.value.what and str(tmp_path) in caught.value.fix
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


def test_cli_build_with_worker_processes_is_clean(tmp_path):
    write_class_folders(tmp_path / "src", classes=2, per_class=20)
    result = subprocess.run([sys.executable, "-m", "caffetune", "build-lmdb", str(tmp_path / "src"), "-o",
                             str(tmp_path / "ds"), "--workers", "2", "--resize", "16x16"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "leaked" not in result.stderr, result.stderr
    assert lmdb_reader.summarize(tmp_path / "ds" / "train_lmdb").count == 40


def test_file_names_that_are_not_utf8_or_hold_line_breaks(tmp_path):
    source = write_class_folders(tmp_path / "src", classes=2, per_class=1)
    image = (source / "class0" / "img0.png").read_bytes()
    os.makedirs(os.fsencode(source / "class0"), exist_ok=True)
    with open(os.fsencode(source / "class0") + b"/caf\xe9.png", "wb") as handle:        # Latin-1 name
        handle.write(image)
    (source / "class1" / "two\nlines.png").write_bytes(image)
    summary = _build(source, tmp_path / "ds", shuffle=False)
    assert summary.images == 3
    assert summary.skipped == [("class1/two\nlines.png", "line break in the file name: a list file cannot name it")]
    assert b"class0/caf\xe9.png 0\n" in (tmp_path / "ds" / "train.txt").read_bytes()
    env = lmdb.open(str(tmp_path / "ds" / "train_lmdb"), readonly=True, lock=False)
    with env.begin() as txn:
        keys = [bytes(key) for key, _ in txn.cursor()]
    env.close()
    assert b"00000000_class0/caf\xe9.png" in keys, keys
    assert "class1/two\\nlines.png\tline break" in (tmp_path / "ds" / "skipped.tsv").read_text()
