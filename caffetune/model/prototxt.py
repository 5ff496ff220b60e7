"""Prototxt text <-> Caffe messages, with file:line:col in every parse error."""
from __future__ import annotations

import re
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import DecodeError, Message

from caffetune.errors import PrototxtError
from caffetune.model import schema

_FORK_HINT = ("if this file comes from a Caffe fork (SSD, DeepLab, ...), pass --proto with that fork's caffe.proto "
              "(or set CAFFETUNE_PROTO)")


def _hint_for(message: str) -> str:
    if "has no field named" in message or "has no value named" in message or "Unknown enumeration" in message:
        return f"check the spelling of the field; {_FORK_HINT}"
    return "fix the syntax at that position (prototxt is protobuf text format)"


def parse(text: str, message_name: str = "NetParameter", *, path: str = "<text>", proto=None) -> Message:
    """Parse prototxt text into a new message of the schema in use (or `proto`, a Schema)."""
    message = (proto or schema.current()).message_class(message_name)()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as error:
        line, column = error.GetLine(), error.GetColumn()
        detail = re.sub(r"^\d+:\d+ : ", "", str(error))
        where = f"{path}:{line}:{column}" if line else path
        raise PrototxtError(detail, where=where, fix=_hint_for(detail)) from None
    return message


def read_text(path: Path | str) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise PrototxtError("file not found", where=str(path), fix="check the path") from None
    except IsADirectoryError:
        raise PrototxtError("is a directory, not a file", where=str(path), fix="pass the file's path") from None
    except UnicodeDecodeError:
        raise PrototxtError("not a text file (is it a binary .caffemodel or .binaryproto?)", where=str(path),
                            fix="pass the .prototxt file here") from None


def load(path: Path | str, message_name: str = "NetParameter") -> Message:
    """Read and parse a prototxt file."""
    return parse(read_text(path), message_name, path=str(path))


def load_binary(path: Path | str, message_name: str = "NetParameter") -> Message:
    """Read a binary proto (.caffemodel, .binaryproto, .solverstate)."""
    message = schema.current().message_class(message_name)()
    try:
        message.ParseFromString(Path(path).read_bytes())
    except FileNotFoundError:
        raise PrototxtError("file not found", where=str(path), fix="check the path") from None
    except IsADirectoryError:
        raise PrototxtError("is a directory, not a file", where=str(path), fix="pass the file's path") from None
    except DecodeError as error:
        raise PrototxtError(f"not a binary {message_name}: {error}", where=str(path),
                            fix="pass a file written by Caffe (e.g. a .caffemodel)") from None
    return message


def format(message: Message) -> str:  # noqa: A001 - mirrors text_format's verb
    """Canonical prototxt text for a message."""
    return text_format.MessageToString(message, as_utf8=True)
