"""Layout-preserving edits keep every comment of the input: in and around deleted fields, in `[a, b]` lists, and in
the canonical fallback."""
from __future__ import annotations

from caffetune.model import comments as comments_module
from caffetune.model import prototxt, textedit

DEPLOY = """# Fully convolutional version (header comment)
name: "Net"
# transform hints:
#  mean_value: [104, 117, 123]
input: "data"   # the image
input_dim: 1
input_dim: 3
input_dim: 8
input_dim: 8
layer {
  name: "data"
  type: "Input"
  top: "data"
  input_param {
    # initial shape for a fully convolutional network:
    # the shape can be set for each input by reshape.
    shape { dim: 1 dim: 3 dim: 8 dim: 8 }
  }
}
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }  # probabilities
"""


def comments(text: str) -> list[str]:
    return textedit.comments_in(text)


def edit(text: str, change) -> str:
    old = prototxt.parse(text)
    new = type(old)()
    new.CopyFrom(old)
    change(new)
    result = textedit.render(text, old, new)
    assert result is not None and prototxt.parse(result) == new
    return result


def test_deleting_fields_and_layers_keeps_the_comments_in_and_around_them():
    def drop_inputs_and_layers(net):
        for name in ("input", "input_dim"):
            net.ClearField(name)
        del net.layer[2]
        del net.layer[0]

    result = edit(DEPLOY, drop_inputs_and_layers)
    assert comments(result) == comments(DEPLOY)
    assert "input_dim" not in result and "Softmax" not in result and "Input" not in result


def test_deleting_a_field_inside_a_one_line_block_keeps_the_line():
    result = edit(DEPLOY, lambda net: net.layer[1].inner_product_param.ClearField("num_output"))
    assert 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { } }' in result


def test_list_values_are_edited_in_place():
    text = ('layer { name: "r" type: "Reshape" bottom: "fc" top: "r" '
            'reshape_param { shape { dim: [-1, 1, 3, 101] } } }  # consensus\n')
    result = edit(text, lambda net: net.layer[0].reshape_param.shape.dim.__setitem__(3, 7))
    assert result == text.replace("101]", "7]")


def test_appending_to_a_list_goes_after_the_whole_list():
    text = 'layer {\n  name: "d"\n  type: "Data"\n  transform_param {\n    mean_value: [104, 117,\n      123]\n  }\n}\n'
    result = edit(text, lambda net: net.layer[0].transform_param.mean_value.append(99))
    assert "123]\n    mean_value: 99\n" in result


def test_a_list_is_deleted_only_as_a_whole():
    text = 'layer { name: "d" type: "Data" transform_param { mean_value: [1, 2, 3] } }  # means\n'
    result = edit(text, lambda net: net.layer[0].transform_param.ClearField("mean_value"))
    assert "mean_value" not in result and "# means" in result
    old = prototxt.parse(text)
    partial = type(old)()
    partial.CopyFrom(old)
    del partial.layer[0].transform_param.mean_value[1:]
    assert textedit.render(text, old, partial) is None     # the caller falls back to canonical text


def test_canonical_fallback_carries_every_comment_to_its_layer():
    old = prototxt.parse(DEPLOY)
    new = type(old)()
    new.CopyFrom(old)
    new.layer[1].name = "fc_new"
    text = comments_module.canonical(DEPLOY, new)
    assert prototxt.parse(text) == new
    assert comments(text) == comments(DEPLOY)
    assert text.index("# initial shape") < text.index('name: "data"') < text.index("# probabilities")


def test_comments_are_carried_even_when_the_old_text_cannot_be_scanned():
    old_text = "# keep me\nname: 'x' layer { name: 'a' @ }"
    result = comments_module.carry_comments(old_text, 'name: "x"\n')
    assert result == '# keep me\nname: "x"\n'


V1_TEXT = """# header
name: "V1"
layers { name: "data" type: DATA top: "data" top: "label" data_param { source: "a" batch_size: 1 }
         include: { phase: TRAIN } }
# the TEST data layer
layers { name: "data" type: DATA top: "data" top: "label" data_param { source: "b" batch_size: 1 }  # val
         include: { phase: TEST } }
# the classifier
layers { name: "fc8" type: INNER_PRODUCT bottom: "data" top: "fc8" inner_product_param { num_output: 3 } }
layers { name: "loss" type: SOFTMAX_LOSS bottom: "fc8" bottom: "label" }  # loss
"""


def _upgraded(rename: str | None = None):
    from caffetune.surgery import net_edits

    old = prototxt.parse(V1_TEXT)
    new = net_edits.upgrade_v1(old)
    if rename:
        new.layer[2].name = rename
    return old, new


def test_an_upgraded_v1_net_keeps_each_comment_before_its_layer():
    """V1 `layers {}` become `layer {}`: the same layers for their comments, the TEST `data` layer told apart from
    the TRAIN one by its position among the layers of that name."""
    old, new = _upgraded()
    result = textedit.render(V1_TEXT, old, new)
    assert result is not None and prototxt.parse(result) == new
    assert comments(result) == comments(V1_TEXT)
    assert result.index("# the TEST data layer") < result.index('source: "b"')
    assert result.index('source: "a"') < result.index("# the TEST data layer")
    assert result.index("# the classifier") < result.index('name: "fc8"') < result.index("# loss")


def test_a_comment_of_a_renamed_layer_follows_the_layer_before_it():
    old, new = _upgraded(rename="fc8_new")
    result = textedit.render(V1_TEXT, old, new)
    assert prototxt.parse(result) == new and comments(result) == comments(V1_TEXT)
    assert result.index('source: "b"') < result.index("# the classifier") < result.index('name: "fc8_new"')


def test_v0_entries_are_keyed_by_their_inner_layer_name():
    text = ('name: "V0"\nlayers { layer { name: "a" type: "relu" } bottom: "x" top: "x" }\n'
            '# before b\nlayers { layer { name: "b" type: "relu" } bottom: "x" top: "x" }\n')
    result = comments_module.carry_comments(text, 'name: "V0"\nlayer { name: "a" }\nlayer { name: "b" }\n')
    assert result == 'name: "V0"\nlayer { name: "a" }\n# before b\nlayer { name: "b" }\n'
