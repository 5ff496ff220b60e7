"""Reading and writing prototxt text spans: the scanner behind textedit and comments, and field formatting.

    nodes = textscan.scan(text)          # top-level field spans (name, value, braces, offsets), nested
    textscan.comments_in(text, a, b)     # the comments that start in text[a:b]
    textscan.format_value(parent, fd, value)   # one field as text_format writes it (layers: name/type/bottom/top first)

Lists of scalars (`dim: [1, 3]`) are scanned element by element, grouped under the whole field; syntax the editor
does not handle (lists of messages, unbalanced braces) raises Unsupported, which callers turn into a fallback.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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


class Unsupported(Exception):
    """Syntax the editor does not handle (lists `[...]`, extensions); the caller falls back."""


def tokens(text: str) -> list[tuple[str, str, int]]:
    result, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if not match:
            raise Unsupported(f"unexpected character at {position}")
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
            raise Unsupported(f"unexpected {value!r} at {start}")
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
        raise Unsupported("unbalanced braces")
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
            raise Unsupported(f"list of {value!r} at {offset}")    # lists of messages are left alone
        elements.append(Node(name, offset, offset + len(value), offset, offset + len(value)))
        index += 1
    raise Unsupported("unterminated list")


def scan(text: str) -> list[Node]:
    """The top-level field spans of a prototxt text."""
    nodes, _ = _parse_block(tokens(text), 0, None)
    return nodes


def try_scan(text: str) -> list[Node] | None:
    """`scan`, or None for text the editor does not handle (unbalanced braces, lists of messages, ...)."""
    try:
        return scan(text)
    except (Unsupported, IndexError):
        return None


def line_start(text: str, offset: int) -> int:
    return text.rfind("\n", 0, offset) + 1


def comments_in(text: str, start: int = 0, end: int | None = None) -> list[str]:
    """The comments (`# ...`, without the line break) that start in text[start:end]."""
    end = len(text) if end is None else end
    return [match.group() for match in comment_matches(text) if start <= match.start() < end]


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
