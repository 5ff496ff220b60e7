"""Preflight on HDF5Data layers: a source that is the .h5 file itself, relative or missing files, datasets that do
not match the layer's tops. The real Caffe shows the failure each check prevents."""
from __future__ import annotations

import subprocess

import h5py
import numpy as np
import pytest

from preflight_helpers import assert_clean, check_text, fatal_line, only, train

HDF5_NET = """name: "h5"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "SOURCE" batch_size: 4 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _solver(folder) -> str:
    return (f'net: "{folder / "train_val.prototxt"}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 4\n'
            f'display: 1\nsolver_mode: CPU\nsnapshot_prefix: "{folder}/s"\n')


def _h5(path, **datasets):
    datasets = datasets or {"data": np.random.default_rng(0).random((8, 3), np.float32),
                            "label": (np.arange(8) % 2).astype(np.float32)}
    with h5py.File(path, "w") as handle:
        for name, values in datasets.items():
            handle[name] = values
    return path


def _listing(folder, *paths):
    listing = folder / "train_h5.txt"
    listing.write_text("".join(f"{path}\n" for path in paths))
    return listing


def test_an_hdf5_file_given_as_the_source_is_an_error_and_caffe_stops(tmp_path, caffe_install):
    h5 = _h5(tmp_path / "train.h5")
    text = HDF5_NET.replace("SOURCE", str(h5))
    message = only(check_text(text).problems)
    assert f"HDF5Data source {h5} is an HDF5 file, not the list of HDF5 files caffe expects" in message
    assert f"echo {h5} > train.txt" in message
    (tmp_path / "train_val.prototxt").write_text(text)
    (tmp_path / "solver.prototxt").write_text(_solver(tmp_path))
    result = subprocess.run([str(caffe_install.binary), "train", f"-solver={tmp_path / 'solver.prototxt'}"],
                            env=dict(caffe_install.env(), GLOG_logtostderr="1"), capture_output=True,
                            timeout=300)   # bytes: caffe logs the binary line as a file name
    assert result.returncode != 0 and b"Failed opening HDF5 file: \x89HDF" in result.stderr


def test_a_proper_list_is_clean_and_trains(tmp_path, caffe_install):
    text = HDF5_NET.replace("SOURCE", str(_listing(tmp_path, _h5(tmp_path / "train.h5"))))
    assert_clean(check_text(text, caffe_install, solver_text=_solver(tmp_path)))
    result = train(caffe_install, tmp_path, text, _solver(tmp_path))
    assert result.returncode == 0, fatal_line(result)


@pytest.mark.parametrize("entry, expected", [
    ("train.h5", "are relative paths (caffe reads them from the run directory"),
    ("/no/such/train.h5", "are files that do not exist"),
])
def test_relative_or_missing_listed_files_are_errors(tmp_path, entry, expected):
    _h5(tmp_path / "train.h5")
    message = only(check_text(HDF5_NET.replace("SOURCE", str(_listing(tmp_path, entry)))).problems)
    assert f"1 of the 1 files listed in {tmp_path / 'train_h5.txt'} {expected}" in message


def test_datasets_not_named_after_the_tops_are_an_error_and_caffe_stops(tmp_path, caffe_install):
    h5 = _h5(tmp_path / "train.h5", X=np.zeros((8, 3), np.float32), y=np.zeros(8, np.float32))
    text = HDF5_NET.replace("SOURCE", str(_listing(tmp_path, h5)))
    message = only(check_text(text).problems)
    assert f"{h5} has no dataset named data, label (its datasets: X, y)" in message
    result = train(caffe_install, tmp_path, text, _solver(tmp_path))
    assert result.returncode != 0 and "H5LTfind_dataset" in fatal_line(result)


def test_datasets_of_different_lengths_are_an_error_and_caffe_stops(tmp_path, caffe_install):
    h5 = _h5(tmp_path / "train.h5", data=np.zeros((8, 3), np.float32), label=np.zeros(6, np.float32))
    text = HDF5_NET.replace("SOURCE", str(_listing(tmp_path, h5)))
    assert "have different numbers of rows (data 8, label 6)" in only(check_text(text).problems)
    result = train(caffe_install, tmp_path, text, _solver(tmp_path))
    assert result.returncode != 0 and "shape(0) == num" in fatal_line(result)
