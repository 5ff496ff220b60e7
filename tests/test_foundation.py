"""Issue 2: the schema, the Caffe build, doctor, and a real `caffe train` on a tiny LMDB."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from caffetune import files
from caffetune.model import prototxt
from caffetune.model import schema
from caffetune.cli import cli
from caffetune.errors import PrototxtError
from helpers import caffe_train, run_pycaffe, write_tiny_classifier


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


def test_doctor_json_names_binary_pycaffe_and_schema(caffe_install):
    result = subprocess.run([sys.executable, "-m", "caffetune", "doctor", "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["caffe"] == str(caffe_install.binary)
    assert report["pycaffe"].endswith("__init__.py")
    assert "caffe.proto" in report["schema"]
    assert report["build"] in ("CPU_ONLY", "CUDA")


def test_doctor_fails_with_the_fix_when_caffe_is_missing(tmp_path):
    result = CliRunner().invoke(cli, ["--caffe", str(tmp_path / "nope"), "doctor"])
    assert result.exit_code == 3
    assert "not an executable caffe binary" in result.output


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out" / "net.prototxt"
    files.write_atomic(target, "name: 'n'\n")
    assert target.read_text() == "name: 'n'\n"
    assert [p.name for p in target.parent.iterdir()] == ["net.prototxt"]


def test_real_caffe_trains_a_tiny_net_on_a_tiny_lmdb(caffe_install, tmp_path):
    _, solver = write_tiny_classifier(tmp_path, max_iter=5)
    result = caffe_train(caffe_install, solver)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Optimization Done." in result.stderr
    assert (tmp_path / "snap_iter_5.caffemodel").is_file()
