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

_TOKEN = re.compile(r"""
    (?P<space>\s+) | (?P<comment>\#[^\n]*) |
    (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*') |
    (?P<word>[A-Za-z0-9_.+\-]+) | (?P<punct>[{}<>:\[\],;])
""", re.VERBOSE)


@dataclass
class Node:
    """One field occurrence in the text: `name: value` or `name { ... }`."""

    name: str
    start: int                     # offset of the field name
    end: int                       # offset just after the value or closing brace
    value_start: int = 0
    value_end: int = 0
    children: list[Node] | None = None   # set for message values
    open: int = 0                  # offset of "{" / "<" for messages
    close: int = 0                 # offset of "}" / ">" for messages
    group: Node | None = None    # for an element of `name: [a, b]`: the whole list field


class _Unsupported(Exception):
    """Syntax the editor does not handle (lists `[...]`, extensions); the caller falls back."""


def _tokens(text: str) -> list[tuple[str, str, int]]:
    result, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise _Unsupported(f"unexpected character at {position}")
        kind = match.lastgroup
        if kind not in ("space", "comment"):
            result.append((kind, match.group(), match.start()))
        position = match.end()
    return result


def _parse_block(tokens, index: int, closer: str | None) -> tuple[list[Node], int]:
    nodes: list[Node] = []
    while index < len(tokens):
        kind, value, start = tokens[index]
        if closer and value == closer and kind == "punct":
            return nodes, index
        if value in (",", ";"):
            index += 1
            continue
        if kind != "word":
            raise _Unsupported(f"unexpected {value!r} at {start}")
        index += 1
        if index < len(tokens) and tokens[index][1] == ":":
            index += 1
        kind2, value2, start2 = tokens[index]
        if value2 in ("{", "<"):
            children, close_index = _parse_block(tokens, index + 1, "}" if value2 == "{" else ">")
            close = tokens[close_index][2]
            nodes.append(Node(value, start, close + 1, start2, close + 1, children, start2, close))
            index = close_index + 1
        elif value2 == "[":
            elements, index = _parse_list(tokens, index + 1, value, start)
            nodes.extend(elements)
        else:
            end = start2 + len(value2)
            index += 1
            while index < len(tokens) and tokens[index][0] == "string" and kind2 == "string":
                end = tokens[index][2] + len(tokens[index][1])   # adjacent strings concatenate
                index += 1
            nodes.append(Node(value, start, end, start2, end))
    if closer:
        raise _Unsupported("unbalanced braces")
    return nodes, index


def _parse_list(tokens, index: int, name: str, start: int) -> tuple[list[Node], int]:
    """The elements of a scalar list `name: [a, b, c]` as nodes of their own, grouped under the whole field."""
    elements: list[Node] = []
    while index < len(tokens):
        kind, value, offset = tokens[index]
        if value == "]" and kind == "punct":
            group = Node(name, start, offset + 1, start, offset + 1)
            for element in elements:
                element.group = group
            return elements, index + 1
        if value == ",":
            index += 1
            continue
        if kind not in ("word", "string"):
            raise _Unsupported(f"list of {value!r} at {offset}")    # lists of messages are left alone
        elements.append(Node(name, offset, offset + len(value), offset, offset + len(value)))
        index += 1
    raise _Unsupported("unterminated list")


def scan(text: str) -> list[Node]:
    """The top-level field spans of a prototxt text."""
    nodes, _ = _parse_block(_tokens(text), 0, None)
    return nodes


def try_scan(text: str) -> list[Node] | None:
    """`scan`, or None for text the editor does not handle (unbalanced braces, lists of messages, ...)."""
    try:
        return scan(text)
    except (_Unsupported, IndexError):
        return None


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
                raise _Unsupported("overlapping edits")
            out.append(self.text[last:start])
            out.append(new)
            last = end
        out.append(self.text[last:])
        return "".join(out)


def _line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


def _indent_of(text: str, offset: int) -> str:
    begin = _line_start(text, offset)
    prefix = text[begin:offset]
    return prefix if prefix.strip() == "" else re.match(r"\s*", prefix).group()


def _alone_on_line(text: str, node: Node) -> bool:
    before = text[_line_start(text, node.start):node.start]
    after_end = text.find("\n", node.end)
    after = text[node.end: after_end if after_end >= 0 else len(text)]
    return before.strip() == "" and (after.strip() == "" or after.strip().startswith("#"))


def comments_in(text: str, start: int = 0, end: int | None = None) -> list[str]:
    """The comments (`# ...`, without the line break) that start in text[start:end]."""
    end = len(text) if end is None else end
    return [match.group() for match in comment_matches(text) if start <= match.start() < end]


def _delete(edits: _Edits, node: Node) -> None:
    """Delete a field occurrence, keeping every comment in it or after it on its line (your file stays yours)."""
    if node.group is not None:
        raise _Unsupported("deleting one element of a list")
    text = edits.text
    if _alone_on_line(text, node):
        line_end = text.find("\n", node.end)
        end = line_end + 1 if line_end >= 0 else len(text)
        start = _line_start(text, node.start)
        indent = text[start:node.start]
        edits.replace(start, end, "".join(f"{indent}{comment}\n" for comment in comments_in(text, node.start, end)))
    else:
        end = node.end
        while end < len(text) and text[end] in " \t":
            end += 1
        kept = comments_in(text, node.start, node.end)
        edits.replace(node.start, end, "".join(f"{comment}\n" for comment in kept))


def to_text(message: Message, one_line: bool = False) -> str:
    """text_format's output with floats as Caffe's nets write them (10, 0.9, 0.0005 rather than 10.0)."""
    return text_format.MessageToString(message, as_utf8=True, as_one_line=one_line, float_format=".7g")


_LEADING_FIELDS = ("name", "type", "bottom", "top")   # how layers are written by hand, V1 ones included


def _layer_text(value: Message, one_line: bool) -> str:
    """A layer message's fields with name, type, bottom, top first (V1 numbers them otherwise)."""
    pieces = []
    ordered = sorted(value.ListFields(), key=lambda item: (
        _LEADING_FIELDS.index(item[0].name) if item[0].name in _LEADING_FIELDS else len(_LEADING_FIELDS),
        item[0].number))
    for fd, field_value in ordered:
        holder = type(value)()
        if fd.label == FieldDescriptor.LABEL_REPEATED:
            getattr(holder, fd.name).extend(field_value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(holder, fd.name).CopyFrom(field_value)
        else:
            setattr(holder, fd.name, field_value)
        pieces.append(to_text(holder, one_line).strip("\n "))
    return " ".join(pieces) if one_line else "\n".join(pieces)


def format_value(parent: Message, fd: FieldDescriptor, value, indent: str = "", one_line: bool = False) -> str:
    """Text of one field (`name: value` or `name { ... }`) as text_format writes it."""
    if fd.type == FieldDescriptor.TYPE_MESSAGE and "name" in fd.message_type.fields_by_name and \
            "type" in fd.message_type.fields_by_name and "bottom" in fd.message_type.fields_by_name:
        body = _layer_text(value, one_line)
        if one_line:
            return f"{fd.name} {{ {body} }}"
        inner = "\n".join(f"{indent}  {line}" for line in body.split("\n"))
        return f"{fd.name} {{\n{inner}\n{indent}}}"
    holder = type(parent)()
    if fd.label == FieldDescriptor.LABEL_REPEATED:
        container = getattr(holder, fd.name)
        container.add().CopyFrom(value) if fd.type == FieldDescriptor.TYPE_MESSAGE else container.append(value)
    elif fd.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(holder, fd.name).CopyFrom(value)
        if not value.ListFields():
            getattr(holder, fd.name).SetInParent()
    else:
        setattr(holder, fd.name, value)
    written = to_text(holder, one_line).rstrip("\n")
    if fd.type == FieldDescriptor.TYPE_STRING:   # text_format escapes ' inside "...": param_str "'num_classes': 7"
        written = re.sub(r"(?<!\\)((?:\\\\)*)\\'", r"\1'", written)
    if one_line:
        return written
    lines = written.split("\n")
    return "\n".join([lines[0]] + [indent + line for line in lines[1:]])


def _block_is_one_line(text: str, node: Node | None) -> bool:
    return node is not None and "\n" not in text[node.open:node.close]


def _starts_line(text: str, offset: int) -> bool:
    return text[_line_start(text, offset):offset].strip() == ""


def _child_indent(text: str, block: Node | None, after: Node) -> str:
    """Indentation for a new field in `block`: that of a sibling starting its own line, else the block's + 2."""
    if _starts_line(text, after.start):
        return text[_line_start(text, after.start):after.start]
    siblings = block.children if block is not None else []
    for node in siblings:
        if _starts_line(text, node.start):
            return text[_line_start(text, node.start):node.start]
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
        position = _line_start(text, block.close)
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
        raise _Unsupported(f"{fd.name}: text and message disagree")
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
    line_start = _line_start(text, node.start)
    if text[line_start:node.start].strip():
        edits.replace(node.start, node.start, format_value(parent, fd, value, one_line=True) + " ")
        return
    indent = text[line_start:node.start]
    edits.replace(line_start, line_start, f"{indent}{format_value(parent, fd, value, indent)}\n")


def _diff_repeated_scalars(edits, block, nodes, parent_old, parent_new, fd, top_end) -> None:
    old, new = list(getattr(parent_old, fd.name)), list(getattr(parent_new, fd.name))
    if old == new:
        return
    occurrences = [node for node in nodes if node.name == fd.name]
    if len(occurrences) != len(old):
        raise _Unsupported(f"{fd.name}: text and message disagree")
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
            raise _Unsupported("deleting part of a list")
        _delete(edits, group)


def _list_size(text: str, group: Node) -> int:
    return len([token for token in _tokens(text[group.start:group.end]) if token[0] in ("word", "string")]) - 1


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
            raise _Unsupported(f"{fd.name}: written {len(occurrences)} times")
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


def render(text: str, old: Message, new: Message) -> str | None:
    """`text` (which parses to `old`) edited to parse to `new`; None when that cannot be done faithfully."""
    try:
        nodes = scan(text)
        edits = _Edits(text)
        top_end = len(text)
        _diff_message(edits, None, nodes, old, new, top_end)
        result = edits.apply()
    except (_Unsupported, IndexError):
        return None
    check = type(new)()
    try:
        text_format.Parse(result, check)
    except text_format.ParseError:
        return None
    return result if check == new else None


def comment_matches(text: str):
    """The regex matches of every comment of `text`, in order."""
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            position += 1
            continue
        if match.lastgroup == "comment":
            yield match
        position = match.end()
