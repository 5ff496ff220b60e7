"""The schema (pinned caffe.proto, or a fork's compiled on the fly), prototxt parse errors, and pycaffe's own
protobuf module side by side with caffetune's in one process."""
from __future__ import annotations

import pytest

from caffetune.errors import PrototxtError
from caffetune.model import prototxt, schema

from helpers import run_pycaffe


def test_pinned_schema_parses_a_net():
    net = prototxt.parse('name: "n" layer { name: "fc" type: "InnerProduct" inner_product_param { num_output: 3 } }')
    assert net.layer[0].inner_product_param.num_output == 3
    assert schema.current().package == "caffe"


def test_parse_error_names_file_line_column_and_field():
    with pytest.raises(PrototxtError) as caught:
        prototxt.parse('name: "n"\nlayer {\n  nmae: "fc"\n}\n', path="net.prototxt")
    assert caught.value.where == "net.prototxt:3:3"
    assert '"nmae"' in caught.value.what
    assert "--proto" in caught.value.fix


def test_fork_proto_is_compiled_on_the_fly_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFETUNE_CACHE", str(tmp_path / "cache"))
    from caffetune._generated import caffe_schema

    pinned_text = open(caffe_schema.SOURCE).read()
    fork = tmp_path / "caffe.proto"
    # A fork adds a layer parameter, as SSD adds e.g. prior_box_param.
    fork.write_text(pinned_text.replace("message LayerParameter {",
                                        "message LayerParameter {\n  optional uint32 fork_only_field = 9999;", 1))
    text = 'layer { name: "x" type: "Fork" fork_only_field: 7 }'
    with pytest.raises(PrototxtError):
        prototxt.parse(text)
    forked = schema.load(fork)
    assert prototxt.parse(text, proto=forked).layer[0].fork_only_field == 7
    assert list((tmp_path / "cache" / "schemas").glob("*.desc")), "compiled schema is cached by content hash"


def test_pycaffe_and_caffetune_schema_coexist_in_one_process(caffe_install):
    # Both orders: pycaffe first, then caffetune; and caffetune first, then pycaffe.
    for first, second in (("import caffe", "from caffetune.model import prototxt"),
                          ("from caffetune.model import prototxt", "import caffe")):
        result = run_pycaffe(caffe_install, f"""
            {first}
            {second}
            from caffetune.model import prototxt
            import caffe
            from caffe.proto import caffe_pb2
            ours = prototxt.parse('layer {{ name: "a" type: "ReLU" }}')
            theirs = caffe_pb2.NetParameter()
            theirs.ParseFromString(ours.SerializeToString())
            assert theirs.layer[0].name == "a"
            print("ok")
        """)
        assert result.stdout.strip() == "ok"
