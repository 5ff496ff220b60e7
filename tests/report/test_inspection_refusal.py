"""`caffetune inspect` on a net the detection/segmentation analysis refuses shows the analysis' reason, not the
classifier rule's "no classifier head found"."""
from __future__ import annotations

from caffetune.model import prototxt
from caffetune.report import inspection
from caffetune.surgery import class_layers

# A text-proposal net: 2-way (text / not text) scores per anchor, which no class count can be set on.
PROPOSALS = """
layer { name: "d" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } } }
layer { name: "f" type: "Convolution" bottom: "data" top: "f" convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "s" type: "Convolution" bottom: "f" top: "s" convolution_param { num_output: 20 kernel_size: 1 } }
layer { name: "b" type: "Convolution" bottom: "f" top: "b" convolution_param { num_output: 20 kernel_size: 1 } }
layer { name: "s_r" type: "Reshape" bottom: "s" top: "s_r" reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "p" type: "Softmax" bottom: "s_r" top: "p" }
"""


def test_inspect_shows_why_the_analysis_refused_the_net(tmp_path):
    names, reason = class_layers.summary(prototxt.parse(PROPOSALS))
    assert names == [] and reason        # the analysis refuses it, with a reason
    path = tmp_path / "proposals.prototxt"
    path.write_text(PROPOSALS)
    report = inspection.inspect_net(path, use_pycaffe=False)
    assert report.heads == [] and report.head_note == reason
    assert "no classifier head" not in report.head_note
