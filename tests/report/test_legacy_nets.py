"""inspect and draw read nets as Caffe does: V0 nets upgraded, `layers {}` blocks with string types read as layers."""
from __future__ import annotations

from pathlib import Path

from caffetune.report import draw, inspection

DATA = Path(__file__).resolve().parent.parent / "data" / "rewrite"


def test_inspect_reads_a_v0_net_and_finds_its_head():
    report = inspection.inspect_net(DATA / "lenet_v0.prototxt", use_pycaffe=False)
    assert report.heads == ["ip2"]
    assert [row.type for row in report.layers][:3] == ["Data", "Convolution", "Pooling"]   # padding folded
    assert any("V0 net" in note for note in report.notes)


def test_draw_reads_a_net_with_a_mis_keyed_layer(tmp_path):
    written = draw.draw_net(DATA / "mixed_keys_deploy.prototxt", tmp_path / "net.dot")
    dot = written.read_text()
    assert "prob" in dot and "HEAD" in dot and "classifier" in dot
