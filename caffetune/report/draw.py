"""`caffetune draw`: the net as a graph, layers coloured by learning-rate state and heads marked.

A picture of what `rewrite` did: frozen layers blue, fine-tuned green, new (boosted) layers magenta, heads drawn with
a double border. Layers are nodes and blobs are the labelled edges between them (in-place layers such as ReLU are
chained on their blob). Uses the `graphviz` Python binding; rendering a picture needs Graphviz's `dot` binary
(`make setup` installs Debian's graphviz); a `.dot` output needs only the binding.
"""
from __future__ import annotations

from pathlib import Path

import graphviz
from google.protobuf.message import Message

from caffetune import files
from caffetune.errors import CaffetuneError, NetError
from caffetune.model import heads, shapes, upgrade
from caffetune.model import layers as L
from caffetune.surgery import class_layers, lr_policy

FORMATS = ("png", "svg", "pdf", "dot")
STATE_COLOURS = {"frozen": "#9ecae1", "fine-tuned": "#a1d99b", "new": "#f768a1"}
PLAIN_COLOUR = "#f0f0f0"
DATA_COLOUR = "#fdd0a2"
LEGEND = (("frozen", "frozen (lr_mult 0)"), ("fine-tuned", "fine-tuned"), ("new", "new / boosted lr"))


def _head_names(net: Message) -> set[str]:
    dense = class_layers.summary(net)   # detection/segmentation: the class-dependent layers are marked as heads
    if dense is not None and dense[0]:
        return set(dense[0])
    try:
        return {head.name for head in heads.find_heads(net)}
    except NetError:
        return {head.name for head in heads.traced_heads(net)}


def _label(layer: Message, state: str, is_head: bool, params) -> str:
    lines = [layer.name, L.type_name(layer)]
    if params:
        lines.append(" ".join("x".join("?" if d is None else str(d) for d in shape) for shape in params))
    if state or is_head:
        lines.append(" · ".join(filter(None, [state, "HEAD" if is_head else ""])))
    return "\n".join(lines)


def _node_style(layer: Message, state: str, is_head: bool) -> dict:
    colour = STATE_COLOURS.get(state) or (DATA_COLOUR if not layer.bottom else PLAIN_COLOUR)
    style = {"shape": "box", "style": "rounded,filled", "fillcolor": colour, "fontname": "Helvetica"}
    if is_head:
        style.update(peripheries="2", penwidth="2.5", color="#ae017e")
    return style


def _shape_text(shape) -> str:
    return "" if shape is None else "x".join("?" if d is None else str(d) for d in shape)


def build_graph(net: Message, *, phase: str = "TRAIN", rankdir: str = "TB", base_dir: Path | None = None):
    """The graphviz Digraph of the net's layers in `phase`."""
    states = lr_policy.layer_states(net)
    head_names = _head_names(net)
    inferred = shapes.infer(net, phase, base_dir)
    graph = graphviz.Digraph(name=net.name or "net", graph_attr={"rankdir": rankdir, "label": net.name,
                                                                 "fontname": "Helvetica"})
    producer: dict[str, str] = {}
    for index, layer in enumerate(L.all_layers(net)):
        if phase not in L.phases(layer):
            continue
        node = f"layer{index}"
        state, is_head = states.get(layer.name, ""), layer.name in head_names
        graph.node(node, _label(layer, state, is_head, inferred.params.get(layer.name)),
                   **_node_style(layer, state, is_head))
        for blob in layer.bottom:
            if blob in producer:
                graph.edge(producer[blob], node, label=f"{blob}\n{_shape_text(inferred.blobs.get(blob))}".strip(),
                           fontsize="9", fontname="Helvetica")
        for blob in layer.top:
            producer[blob] = node
    _add_legend(graph)
    return graph


def _add_legend(graph) -> None:
    with graph.subgraph(name="cluster_legend", graph_attr={"label": "legend", "fontname": "Helvetica"}) as legend:
        for state, text in LEGEND:
            legend.node(f"legend_{state}", text, shape="box", style="rounded,filled",
                        fillcolor=STATE_COLOURS[state], fontname="Helvetica")
        legend.node("legend_head", "classifier head / class-dependent layer", shape="box", style="rounded",
                    peripheries="2", penwidth="2.5", color="#ae017e", fontname="Helvetica")


def draw_net(net_path: Path | str, output: Path | str, *, phase: str = "TRAIN", rankdir: str = "TB") -> Path:
    """Write the picture of the net at `net_path`; the format comes from the output's extension."""
    output = Path(output)
    fmt = output.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise CaffetuneError(f"cannot draw to a .{fmt or '(none)'} file", where=str(output),
                             fix=f"name the output with one of: {', '.join('.' + f for f in FORMATS)}")
    net, _ = upgrade.load(net_path)      # V0 nets upgraded as Caffe reads them
    graph = build_graph(net, phase=phase, rankdir=rankdir, base_dir=Path(net_path).parent)
    if fmt == "dot":
        files.write_atomic(output, graph.source)
        return output
    try:
        data = graph.pipe(format=fmt, quiet=True)
    except graphviz.ExecutableNotFound:
        raise CaffetuneError("Graphviz's `dot` program is not installed", where=str(output),
                             fix="run `make setup` (installs Debian's graphviz) or `apt-get install graphviz`; "
                                 "or write a .dot file") from None
    files.write_atomic(output, data)
    return output
