"""Position-preserving prototxt edits: turn the text of message A into text of message B, changing only what differs.

    new_text = textedit.render(old_text, old_message, new_message)

The text is scanned into a tree of field spans (name, value, braces, with offsets); the old and new messages are
compared field by field and only the differing fields are replaced, inserted or deleted, so comments, order and
layout survive and a diff shows only the real changes. Layers (repeated messages with a `name`) are matched by
name, other repeated messages by position. `render` re-parses its result and returns it only when it equals
`new_message`; otherwise it returns None and the caller falls back to canonical text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from google.protobuf import text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from caffetune.model import comments
from caffetune.model.textscan import (  # noqa: F401 - textedit's public API
    Node,
    Unsupported,
    comment_matches,
    comments_in,
    format_value,
    line_start,
    scan,
    to_text,
    tokens,
    try_scan,
)


@dataclass
class _Edits:
    text: str
    edits: list[tuple[int, int, str]] = field(default_factory=list)   # (start, end, replacement)

    def replace(self, start: int, end: int, new: str) -> None:
        self.edits.append((start, end, new))

    def apply(self) -> str:
        out, last = [], 0
        for start, end, new in sorted(self.edits, key=lambda e: (e[0], e[1])):
            if start < last:
                raise Unsupported("overlapping edits")
            out.append(self.text[last:start])
            out.append(new)
            last = end
        out.append(self.text[last:])
        return "".join(out)


def _indent_of(text: str, offset: int) -> str:
    begin = line_start(text, offset)
    prefix = text[begin:offset]
    return prefix if prefix.strip() == "" else re.match(r"\s*", prefix).group()


def _alone_on_line(text: str, node: Node) -> bool:
    before = text[line_start(text, node.start):node.start]
    after_end = text.find("\n", node.end)
    after = text[node.end: after_end if after_end >= 0 else len(text)]
    return before.strip() == "" and (after.strip() == "" or after.strip().startswith("#"))


def _delete(edits: _Edits, node: Node) -> None:
    """Delete a field occurrence, keeping every comment in it or after it on its line (your file stays yours)."""
    if node.group is not None:
        raise Unsupported("deleting one element of a list")
    text = edits.text
    if _alone_on_line(text, node):
        line_end = text.find("\n", node.end)
        end = line_end + 1 if line_end >= 0 else len(text)
        start = line_start(text, node.start)
        indent = text[start:node.start]
        edits.replace(start, end, "".join(f"{indent}{comment}\n" for comment in comments_in(text, node.start, end)))
    else:
        end = node.end
        while end < len(text) and text[end] in " \t":
            end += 1
        kept = comments_in(text, node.start, node.end)
        edits.replace(node.start, end, "".join(f"{comment}\n" for comment in kept))


def _block_is_one_line(text: str, node: Node | None) -> bool:
    return node is not None and "\n" not in text[node.open:node.close]


def _starts_line(text: str, offset: int) -> bool:
    return text[line_start(text, offset):offset].strip() == ""


def _child_indent(text: str, block: Node | None, after: Node) -> str:
    """Indentation for a new field in `block`: that of a sibling starting its own line, else the block's + 2."""
    if _starts_line(text, after.start):
        return text[line_start(text, after.start):after.start]
    siblings = block.children if block is not None else []
    for node in siblings:
        if _starts_line(text, node.start):
            return text[line_start(text, node.start):node.start]
    return (_indent_of(text, block.start) + "  ") if block is not None else ""


def _insert_in_block(edits: _Edits, block: Node | None, after: Node | None, parent: Message, fd, value,
                     top_level_end: int) -> None:
    """Insert one field occurrence after `after` (a sibling) or at the end of the block."""
    text = edits.text
    if block is not None and _block_is_one_line(text, block):
        position = after.end if after else block.close
        snippet = format_value(parent, fd, value, one_line=True)
        edits.replace(position, position, f" {snippet}" if after else f"{snippet} ")
        return
    if after is not None:
        indent = _child_indent(text, block, after)
        line_end = text.find("\n", after.end)
        position = line_end + 1 if line_end >= 0 else len(text)
        prefix = "" if line_end >= 0 else "\n"
    elif block is not None:
        indent = _indent_of(text, block.close) + "  "
        position = line_start(text, block.close)
        prefix = ""
        if text[position:block.close].strip():
            position, prefix = block.close, "\n"
    else:
        indent, position = "", top_level_end
        prefix = "" if position == 0 or text[position - 1] == "\n" else "\n"
    snippet = format_value(parent, fd, value, indent)
    edits.replace(position, position, f"{prefix}{indent}{snippet}\n")


_AFTER_FIELDS = {"input": ("input", "name"), "input_dim": ("input_dim", "input", "name"),
                 "input_shape": ("input_shape", "input", "name"),
                 "param": ("param", "top", "bottom", "type", "name"),
                 "blobs_lr": ("blobs_lr", "top", "bottom"), "weight_decay": ("weight_decay", "blobs_lr", "top")}


def _anchor(nodes: list[Node], name: str) -> Node | None:
    """The sibling a new `name` field goes after: the last of the same name, else a conventional predecessor."""
    for candidate in _AFTER_FIELDS.get(name, (name,)):
        matches = [node for node in nodes if node.name == candidate]
        if matches:
            return matches[-1].group or matches[-1]
    return None


def _match_by_name(old: list[Message], new: list[Message]) -> list[tuple[int | None, int | None]]:
    """Align two lists of layers by name (LCS), yielding (old index, new index) pairs with None for gaps."""
    old_names = [getattr(m, "name", None) for m in old]
    new_names = [getattr(m, "name", None) for m in new]
    rows, cols = len(old_names), len(new_names)
    table = [[0] * (cols + 1) for _ in range(rows + 1)]
    for i in range(rows - 1, -1, -1):
        for j in range(cols - 1, -1, -1):
            table[i][j] = (table[i + 1][j + 1] + 1 if old_names[i] == new_names[j]
                           else max(table[i + 1][j], table[i][j + 1]))
    pairs, i, j = [], 0, 0
    while i < rows and j < cols:
        if old_names[i] == new_names[j]:
            pairs.append((i, j))
            i, j = i + 1, j + 1
        elif table[i + 1][j] >= table[i][j + 1]:
            pairs.append((i, None))
            i += 1
        else:
            pairs.append((None, j))
            j += 1
    pairs += [(k, None) for k in range(i, rows)] + [(None, k) for k in range(j, cols)]
    return _pair_renamed(pairs, old, new)


def _pair_renamed(pairs, old: list[Message], new: list[Message]):
    """Within each gap between matched layers, pair a removed and an added layer of the same type: a rename edits
    the layer in place (keeping its comments) instead of deleting and re-inserting it."""
    result, gap = [], []

    def flush():
        removed = [i for i, j in gap if j is None]
        added = [j for i, j in gap if i is None]
        for i in list(removed):
            same = next((j for j in added if getattr(new[j], "type", 0) == getattr(old[i], "type", 1)), None)
            if same is not None:
                added.remove(same)
                removed.remove(i)
                result.append((i, same))
        result.extend([(i, None) for i in removed] + [(None, j) for j in added])
        gap.clear()

    for pair in pairs:
        if pair[0] is not None and pair[1] is not None:
            flush()
            result.append(pair)
        else:
            gap.append(pair)
    flush()
    return result


def _diff_repeated_messages(edits, block, nodes, parent_old, parent_new, fd, top_end) -> None:
    old, new = list(getattr(parent_old, fd.name)), list(getattr(parent_new, fd.name))
    occurrences = [node for node in nodes if node.name == fd.name]
    if len(occurrences) != len(old):
        raise Unsupported(f"{fd.name}: text and message disagree")
    named = "name" in fd.message_type.fields_by_name
    if named:
        pairs = _match_by_name(old, new)
    else:
        pairs = [(k if k < len(old) else None, k if k < len(new) else None) for k in range(max(len(old), len(new)))]
    last_node = None if occurrences else _anchor(nodes, fd.name)
    for old_index, new_index in pairs:
        if old_index is not None and new_index is not None:
            _diff_message(edits, occurrences[old_index], occurrences[old_index].children, old[old_index],
                          new[new_index], top_end)
            last_node = occurrences[old_index]
        elif old_index is not None:
            _delete(edits, occurrences[old_index])
        elif last_node is None and occurrences:
            _insert_before(edits, occurrences[0], parent_new, fd, new[new_index])
        else:
            _insert_in_block(edits, block, last_node, parent_new, fd, new[new_index], top_end)


def _insert_before(edits: _Edits, node: Node, parent: Message, fd, value) -> None:
    """Insert one field occurrence just before `node` (a new first layer goes before the old first one)."""
    text = edits.text
    begin = line_start(text, node.start)
    if text[begin:node.start].strip():
        edits.replace(node.start, node.start, format_value(parent, fd, value, one_line=True) + " ")
        return
    indent = text[begin:node.start]
    edits.replace(begin, begin, f"{indent}{format_value(parent, fd, value, indent)}\n")


def _diff_repeated_scalars(edits, block, nodes, parent_old, parent_new, fd, top_end) -> None:
    old, new = list(getattr(parent_old, fd.name)), list(getattr(parent_new, fd.name))
    if old == new:
        return
    occurrences = [node for node in nodes if node.name == fd.name]
    if len(occurrences) != len(old):
        raise Unsupported(f"{fd.name}: text and message disagree")
    for node, old_value, new_value in zip(occurrences, old, new):
        if old_value != new_value:
            _replace_value(edits, parent_new, fd, node, new_value)
    _delete_scalars(edits, occurrences[len(new):])
    anchor = (occurrences[-1].group or occurrences[-1]) if occurrences else _anchor(nodes, fd.name)
    for value in new[len(old):]:
        _insert_in_block(edits, block, anchor, parent_new, fd, value, top_end)


def _delete_scalars(edits: _Edits, doomed: list[Node]) -> None:
    """Delete scalar occurrences; a `[a, b]` list goes only as a whole."""
    groups: dict[int, tuple[Node, int]] = {}
    for node in doomed:
        if node.group is None:
            _delete(edits, node)
        else:
            group, count = groups.get(id(node.group), (node.group, 0))
            groups[id(node.group)] = (group, count + 1)
    for group, count in groups.values():
        if count != sum(1 for node in doomed if node.group is group) or \
                count != _list_size(edits.text, group):
            raise Unsupported("deleting part of a list")
        _delete(edits, group)


def _list_size(text: str, group: Node) -> int:
    return len([token for token in tokens(text[group.start:group.end]) if token[0] in ("word", "string")]) - 1


def _replace_value(edits: _Edits, parent: Message, fd, node: Node, value) -> None:
    written = format_value(parent, fd, value, one_line=True)
    edits.replace(node.value_start, node.value_end, written.split(": ", 1)[1])


def _diff_message(edits: _Edits, block: Node | None, nodes: list[Node], old: Message, new: Message,
                  top_end: int) -> None:
    if old == new:
        return
    for fd in old.DESCRIPTOR.fields:
        repeated = fd.label == FieldDescriptor.LABEL_REPEATED
        is_message = fd.type == FieldDescriptor.TYPE_MESSAGE
        if repeated:
            (_diff_repeated_messages if is_message else _diff_repeated_scalars)(edits, block, nodes, old, new, fd,
                                                                                 top_end)
            continue
        had, has = old.HasField(fd.name), new.HasField(fd.name)
        occurrences = [node for node in nodes if node.name == fd.name]
        if had and len(occurrences) != 1:
            raise Unsupported(f"{fd.name}: written {len(occurrences)} times")
        old_value, new_value = getattr(old, fd.name), getattr(new, fd.name)
        if had and not has:
            _delete(edits, occurrences[0])
        elif has and not had:
            _insert_in_block(edits, block, _anchor(nodes, fd.name), new, fd, new_value, top_end)
        elif had and old_value != new_value:
            if is_message:
                _diff_message(edits, occurrences[0], occurrences[0].children, old_value, new_value, top_end)
            else:
                _replace_value(edits, new, fd, occurrences[0], new_value)


def _layers_change_key(old: Message, new: Message) -> bool:
    """Whether the layers move from V1's `layers` field to `layer` (no layer could be edited in place)."""
    fields = old.DESCRIPTOR.fields_by_name
    return "layers" in fields and "layer" in fields and len(old.layers) > 0 and not new.layers and \
        len(new.layer) > 0 and not old.layer


def render(text: str, old: Message, new: Message) -> str | None:
    """`text` (which parses to `old`) edited to parse to `new`; None when that cannot be done faithfully."""
    if _layers_change_key(old, new):   # an upgraded V1 net: every layer is written anew, each comment before its own
        return comments.carry_comments(text, to_text(new))
    try:
        nodes = scan(text)
        edits = _Edits(text)
        top_end = len(text)
        _diff_message(edits, None, nodes, old, new, top_end)
        result = edits.apply()
    except (Unsupported, IndexError):
        return None
    check = type(new)()
    try:
        text_format.Parse(result, check)
    except text_format.ParseError:
        return None
    return result if check == new else None
