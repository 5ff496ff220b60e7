"""FCN-like nets rewritten for a new class count build in the real pycaffe and give N channels at full resolution,
with the fixed upsampling layers initialised to per-class bilinear interpolation (not zeros)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from caffetune.surgery import rewrite

from helpers import run_pycaffe

DATA = Path(__file__).resolve().parents[1] / "data" / "dense"

BUILD = """
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], getattr(caffe, sys.argv[2]))
net.blobs["data"].data[...] = np.random.RandomState(0).rand(*net.blobs["data"].data.shape)
net.forward()
up = net.params["up_b_new"][0].data
print(json.dumps({"score": list(net.blobs["score"].data.shape),
                  "up_shape": list(up.shape),
                  "up_centre": float(up[0, 0, 1, 1]), "up_sum": float(up[0, 0].sum()),
                  "outputs": {name: list(net.blobs[name].data.shape) for name in net.outputs}}))
"""


@pytest.mark.parametrize("case, role, phase", [("fcn_like_deploy", "deploy", "TEST"),
                                               ("fcn_like_train", "train_val", "TRAIN")])
def test_rewritten_fcn_builds_with_n_channels_at_full_resolution(caffe_install, tmp_path, case, role, phase):
    result = rewrite.rewrite_text((DATA / f"{case}.prototxt").read_text(), rewrite.Options(classes=3, name="new"))
    path = tmp_path / f"{role}.prototxt"
    path.write_text(result.outputs[role].text)
    shapes = json.loads(run_pycaffe(caffe_install, BUILD, str(path), phase).stdout.strip().splitlines()[-1])
    assert shapes["score"] == [1, 3, 32, 32]
    assert shapes["up_shape"] == [3, 1, 4, 4], "one bilinear kernel per class (group = classes)"
    assert shapes["up_centre"] == pytest.approx(0.5625) and shapes["up_sum"] == pytest.approx(4.0)
