"""`caffetune draw` renders the net with learning-rate states and heads (Graphviz's dot, for real)."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from caffetune.cli import cli
from caffetune.errors import CaffetuneError
from caffetune.report import draw

NET = """
name: "rewritten"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 } convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc7" type: "InnerProduct" bottom: "conv1" top: "fc7" inner_product_param { num_output: 8 } }
layer { name: "fc8_new" type: "InnerProduct" bottom: "fc7" top: "fc8_new"
  param { lr_mult: 10 decay_mult: 1 } param { lr_mult: 20 decay_mult: 0 } inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc8_new" top: "prob" }
"""


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return path


def svg_node(svg: str, title: str) -> str:
    """The <g class="node"> element whose <title> is the given node id."""
    match = re.search(rf'<g id="node\d+" class="node">\s*<title>{title}</title>(.*?)</g>', svg, re.S)
    assert match, title
    return match.group(1)


def test_svg_colours_layers_by_state_and_marks_the_head(net, tmp_path):
    out = tmp_path / "net.svg"
    result = CliRunner().invoke(cli, ["draw", str(net), "-o", str(out)])
    assert result.exit_code == 0, result.output
    svg = out.read_text()
    conv, fc7, head = svg_node(svg, "layer1"), svg_node(svg, "layer3"), svg_node(svg, "layer4")
    assert draw.STATE_COLOURS["frozen"] in conv and "frozen" in conv
    assert draw.STATE_COLOURS["fine-tuned"] in fc7 and "fine&#45;tuned" in fc7
    assert draw.STATE_COLOURS["new"] in head and "HEAD" in head
    assert head.count("<path") + head.count("<polygon") >= 2  # double border (peripheries=2)
    assert "HEAD" not in fc7 and "1x3x8x8" in svg  # blob shapes on the edges
    assert "legend" in svg


def test_png_and_dot_outputs(net, tmp_path):
    png = draw.draw_net(net, tmp_path / "net.png", rankdir="LR")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    dot = draw.draw_net(net, tmp_path / "net.dot")
    assert "rankdir=TB" in dot.read_text() and "fc8_new" in dot.read_text()


def test_unknown_extension_is_refused(net, tmp_path):
    with pytest.raises(CaffetuneError, match="cannot draw"):
        draw.draw_net(net, tmp_path / "net.jpeg2000")
    assert not (tmp_path / "net.jpeg2000").exists()
