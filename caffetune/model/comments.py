"""Keeping a prototxt's comments when its text has to be written anew (canonical text, a V0 net upgraded).

    text = comments.canonical(old_text, message)     # to_text(message) with every comment of old_text put back

textedit keeps comments in place when it can edit the old text; this is the fallback when it cannot: each comment
goes back before the top-level field (the layer, matched by name) that it preceded or sat in, so that "your file
stays yours" holds for every comment even when the layout does not.
"""
from __future__ import annotations

from google.protobuf.message import Message

from caffetune.model.textscan import Node, comment_matches, line_start, to_text, try_scan

# A V1 `layers {}` entry becomes a `layer {}` when a net is upgraded: the same layer for its comments.
_SAME_FIELD = {"layers": "layer"}


def _node_key(text: str, node: Node) -> tuple[str, str]:
    """(field, layer name) of a top-level node: what a comment before or inside it is about."""
    field = _SAME_FIELD.get(node.name, node.name)
    children = node.children or []
    inner = next((child for child in children if child.name == "layer" and child.children), None)
    for child in (inner.children if inner is not None else children):   # a V0 entry names its inner `layer`
        if child.name == "name":
            return field, text[child.value_start:child.value_end].strip("\"'")
    return field, ""


def _keys(text: str, nodes: list[Node]) -> list[tuple[str, str, int]]:
    """Each node's key with its occurrence number (a train_val's TRAIN and TEST `data` layers share a name)."""
    seen: dict[tuple[str, str], int] = {}
    keys = []
    for node in nodes:
        key = _node_key(text, node)
        seen[key] = seen.get(key, -1) + 1
        keys.append((*key, seen[key]))
    return keys


def _positions(old_text: str, old_nodes: list[Node], new_text: str, new_nodes: list[Node]) -> list[int]:
    """For each old top-level node, where its comments go in the new text: before the new node with the same key;
    for a node that has none (a renamed head), just after the new node of the nearest earlier old node that has."""
    new_keys = _keys(new_text, new_nodes)
    found = {key: index for index, key in reversed(list(enumerate(new_keys)))}
    starts = [line_start(new_text, node.start) for node in new_nodes] + [len(new_text)]
    positions, after = [], 0
    for key in _keys(old_text, old_nodes):
        index = found.get(key)
        if index is None:
            positions.append(starts[after] if after else 0)
        else:
            positions.append(starts[index])
            after = index + 1
    return positions


def carry_comments(old_text: str, new_text: str) -> str:
    """`new_text` (comment-free) with every comment of `old_text` put back: each before the top-level field it
    preceded or sat in (matched by field and layer name), the others at the top, or at the end after the last."""
    comments = [(match.start(), match.group()) for match in comment_matches(old_text)]
    if not comments:
        return new_text
    old_nodes, new_nodes = try_scan(old_text), try_scan(new_text)
    if old_nodes is None or new_nodes is None:
        old_nodes, new_nodes = [], []
    positions = _positions(old_text, old_nodes, new_text, new_nodes)
    inserts: dict[int, list[str]] = {}
    for offset, comment in comments:
        following = next((index for index, node in enumerate(old_nodes) if node.end > offset), None)
        if following is None:
            position = len(new_text) if old_nodes else 0
        else:
            position = positions[following]
        inserts.setdefault(position, []).append(comment)
    pieces, last = [], 0
    for position in sorted(inserts):
        pieces.append(new_text[last:position])
        if position and not new_text[:position].endswith("\n"):
            pieces.append("\n")
        pieces.append("".join(f"{comment}\n" for comment in inserts[position]))
        last = position
    pieces.append(new_text[last:])
    return "".join(pieces)


def canonical(old_text: str, message: Message) -> str:
    """The canonical text of `message`, keeping the comments of `old_text` (the fallback when render fails)."""
    return carry_comments(old_text, to_text(message))
