"""`rewrite --mirror/--no-mirror`: the TRAIN data layer's random flip, set or left as the net has it."""
from __future__ import annotations

from caffetune.model import prototxt
from caffetune.surgery import rewrite
from caffetune.surgery.net_edits import DataOptions, set_data_layers

DEPLOY = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _mirrors(net) -> dict[str, bool]:
    return {"TRAIN" if any(r.phase == 0 for r in layer.include) else "TEST": layer.transform_param.mirror
            for layer in net.layer if layer.type == "Data"}


def test_no_mirror_turns_the_train_flip_off_and_leaves_test_alone():
    derived = rewrite.rewrite_text(DEPLOY, rewrite.Options(classes=3, data=DataOptions(train_source="t_lmdb",
                                                                                        val_source="v_lmdb")))
    kept = prototxt.parse(derived.outputs["train_val"].text)
    assert _mirrors(kept) == {"TRAIN": True, "TEST": False}           # a derived train_val mirrors by default
    off = rewrite.rewrite_text(DEPLOY, rewrite.Options(classes=3, data=DataOptions(
        train_source="t_lmdb", val_source="v_lmdb", mirror=False)))
    text = off.outputs["train_val"].text
    assert _mirrors(prototxt.parse(text)) == {"TRAIN": False, "TEST": False}
    assert prototxt.format(prototxt.parse(text)) == prototxt.format(prototxt.parse(prototxt.format(
        prototxt.parse(text))))
    assert set_data_layers(prototxt.parse(text), DataOptions()) == prototxt.parse(text)      # None: untouched
    on = set_data_layers(prototxt.parse(text), DataOptions(mirror=True))
    assert _mirrors(on) == {"TRAIN": True, "TEST": False}
