"""Keeping a prototxt's comments when its text has to be written anew (canonical text, a V0 net upgraded).

    text = comments.canonical(old_text, message)     # to_text(message) with every comment of old_text put back

textedit keeps comments in place when it can edit the old text; this is the fallback when it cannot: each comment
goes back before the top-level field (the layer, matched by name) that it preceded or sat in, so that "your file
stays yours" holds for every comment even when the layout does not.
"""
from __future__ import annotations

from google.protobuf.message import Message

from caffetune.model.textedit import Node, comment_matches, to_text, try_scan


def _node_key(text: str, node: Node) -> tuple[str, str]:
    """(field, layer name) of a top-level node: what a comment before or inside it is about."""
    for child in node.children or []:
        if child.name == "name":
            return node.name, text[child.value_start:child.value_end].strip("\"'")
    return node.name, ""


def _line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


def carry_comments(old_text: str, new_text: str) -> str:
    """`new_text` (comment-free) with every comment of `old_text` put back: each before the top-level field it
    preceded or sat in (matched by field and layer name), the others at the top, or at the end after the last."""
    comments = [(match.start(), match.group()) for match in comment_matches(old_text)]
    if not comments:
        return new_text
    old_nodes, new_nodes = try_scan(old_text), try_scan(new_text)
    if old_nodes is None or new_nodes is None:
        old_nodes, new_nodes = [], []
    targets: dict[tuple[str, str], int] = {}
    for node in new_nodes:
        targets.setdefault(_node_key(new_text, node), _line_start(new_text, node.start))
    inserts: dict[int, list[str]] = {}
    for offset, comment in comments:
        following = next((node for node in old_nodes if node.end > offset), None)
        if following is None:
            position = len(new_text) if old_nodes else 0
        else:
            position = targets.get(_node_key(old_text, following), 0)
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
