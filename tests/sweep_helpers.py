"""A tiny classifier on data it can learn (the class is where the image is bright), for sweeps over real runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import optuna
import pytest

from caffetune.model import prototxt, schema

NET = """name: "tiny_learnable"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "{train}" backend: LMDB batch_size: 8 } transform_param { scale: 0.00390625 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "{test}" backend: LMDB batch_size: 8 } transform_param { scale: 0.00390625 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "fc_new" type: "InnerProduct" bottom: "conv2" top: "fc_new"
  param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 }
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "fc_new" bottom: "label" top: "accuracy" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc_new" bottom: "label" top: "loss" }
"""


def write_learnable_lmdb(path: Path, count: int, seed: int, classes: int = 3, size: int = 9) -> Path:
    """Class k: rows of band k bright, the rest dark, plus noise; labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    band = size // classes
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for index in range(count):
            label = index % classes
            image = rng.integers(0, 60, (1, size, size))
            image[:, label * band:(label + 1) * band, :] += 150
            datum = schema.current().Datum(channels=1, height=size, width=size, label=label,
                                           data=image.astype(np.uint8).tobytes())
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()
    return path


def write_learnable_classifier(folder: Path, max_iter: int = 30, test_interval: int = 10,
                               base_lr: float = 0.01) -> tuple[Path, Path]:
    """(net, solver): the net on a 48-image training set and a 24-image test set (test_iter x batch = 24), a
    fixed random_seed so that every trial starts from the same fillers."""
    folder.mkdir(parents=True, exist_ok=True)
    train = write_learnable_lmdb(folder / "train_lmdb", 48, seed=1)
    test = write_learnable_lmdb(folder / "test_lmdb", 24, seed=2)
    net = folder / "train_val.prototxt"
    net.write_text(NET.replace("{train}", str(train)).replace("{test}", str(test)))
    solver = folder / "solver.prototxt"
    solver.write_text(f'net: "{net.name}"\ntest_iter: 3\ntest_interval: {test_interval}\nbase_lr: {base_lr}\n'
                      f'lr_policy: "fixed"\nmomentum: 0.9\nweight_decay: 0.0005\ndisplay: 5\n'
                      f'max_iter: {max_iter}\nrandom_seed: 7\nsnapshot_prefix: "tiny"\nsolver_mode: CPU\n')
    return net, solver


def worker(cwd: Path, *args: str) -> subprocess.Popen:
    """A `caffetune sweep` process, as a user starts one on each machine."""
    return subprocess.Popen([sys.executable, "-m", "caffetune", "sweep", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def trials(study: optuna.Study, state: optuna.trial.TrialState | None = None) -> list:
    return [t for t in study.get_trials() if state is None or t.state == state]


def check_trial_runs(study: optuna.Study) -> None:
    """Each finished trial is a real run directory whose solver carries the trial's own values."""
    for trial in trials(study, optuna.trial.TrialState.COMPLETE):
        run = Path(trial.user_attrs["run"])
        assert run.name == f"trial-{trial.number:04d}"
        solver = prototxt.load(run / "solver.prototxt", "SolverParameter")
        assert solver.base_lr == pytest.approx(trial.params["base_lr"], rel=1e-6)
        assert "Optimization Done." in (run / "caffe.log").read_text()
        reported = [json.loads(line)["accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["phase"] == "test"]
        assert trial.value == max(reported) and list(trial.intermediate_values.values()) == reported
