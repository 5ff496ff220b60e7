"""Caffe's schema (caffe.proto), loaded into a private descriptor pool.

This is the one module that touches the compiled schema. Message classes live in a pool of their own, so pycaffe's
`caffe_pb2` (which registers the same package `caffe` in protobuf's default pool) can be imported in the same
process without a clash.

Where the schema comes from, in order: an explicit path (`--proto`, `CAFFETUNE_PROTO`) compiled on the fly and
cached by content hash; the generated module `caffetune._generated.caffe_schema` that `make proto` builds from the
pinned Caffe source.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from caffetune import files
from caffetune.errors import SchemaError

PROTO_ENV = "CAFFETUNE_PROTO"


def cache_dir() -> Path:
    """caffetune's cache root (shared with the Caffe build of `make caffe`)."""
    if os.environ.get("CAFFETUNE_CACHE"):
        return Path(os.environ["CAFFETUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caffetune"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def compile_descriptor_set(proto: Path) -> bytes:
    """Compile a .proto file with grpcio-tools' protoc; returns a serialized FileDescriptorSet."""
    proto = Path(proto).resolve()
    if not proto.is_file():
        raise SchemaError(f"caffe.proto not found: {proto}",
                          fix="pass --proto with the path of an existing caffe.proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "schema.desc"
        command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}",
                   f"--descriptor_set_out={out}", "--include_imports", proto.name]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SchemaError(f"protoc could not compile the schema: {result.stderr.strip()}", where=str(proto),
                              fix="check that the file is a valid proto2 caffe.proto")
        return out.read_bytes()


@dataclass
class Schema:
    """Caffe's message types, from one compiled caffe.proto."""

    file_set: descriptor_pb2.FileDescriptorSet
    source: str
    sha256: str
    _classes: dict = field(default_factory=dict, repr=False)

    @cached_property
    def pool(self) -> descriptor_pool.DescriptorPool:
        pool = descriptor_pool.DescriptorPool()
        for file_proto in self.file_set.file:
            pool.Add(file_proto)
        return pool

    @cached_property
    def package(self) -> str:
        for file_proto in self.file_set.file:
            if any(m.name == "NetParameter" for m in file_proto.message_type):
                return file_proto.package
        raise SchemaError(f"{self.source} defines no NetParameter message; it is not a caffe.proto",
                          fix="pass --proto with Caffe's caffe.proto (src/caffe/proto/caffe.proto)")

    def message_class(self, name: str) -> type:
        """The generated class for a message of the schema, e.g. `message_class("NetParameter")`."""
        if name not in self._classes:
            try:
                descriptor = self.pool.FindMessageTypeByName(f"{self.package}.{name}")
            except KeyError:
                raise SchemaError(f"the schema {self.source} has no message {name}") from None
            self._classes[name] = message_factory.GetMessageClass(descriptor)
        return self._classes[name]

    def new(self, name: str, **fields):
        return self.message_class(name)(**fields)

    def has_message(self, name: str) -> bool:
        try:
            self.pool.FindMessageTypeByName(f"{self.package}.{name}")
            return True
        except KeyError:
            return False

    # The messages caffetune uses most, for readable call sites.
    @property
    def NetParameter(self) -> type:  # noqa: N802 - mirrors the protobuf name
        return self.message_class("NetParameter")

    @property
    def SolverParameter(self) -> type:  # noqa: N802
        return self.message_class("SolverParameter")

    @property
    def LayerParameter(self) -> type:  # noqa: N802
        return self.message_class("LayerParameter")

    @property
    def BlobProto(self) -> type:  # noqa: N802
        return self.message_class("BlobProto")

    @property
    def Datum(self) -> type:  # noqa: N802
        return self.message_class("Datum")


def _from_serialized(data: bytes, source: str, sha256: str) -> Schema:
    file_set = descriptor_pb2.FileDescriptorSet.FromString(data)
    return Schema(file_set=file_set, source=source, sha256=sha256)


def load_from_proto(proto: Path) -> Schema:
    """Compile (or reuse the cached compile of) an explicit caffe.proto, e.g. a fork's."""
    proto = Path(proto).resolve()
    if not proto.is_file():
        raise SchemaError(f"caffe.proto not found: {proto}", fix="pass --proto (or CAFFETUNE_PROTO) an existing file")
    digest = sha256_of(proto)
    cached = cache_dir() / "schemas" / f"{digest}.desc"
    if not cached.is_file():
        data = compile_descriptor_set(proto)
        files.write_atomic(cached, data)
    return _from_serialized(cached.read_bytes(), str(proto), digest)


def load_pinned() -> Schema:
    """The schema generated by `make proto` from the pinned Caffe source."""
    try:
        from caffetune._generated import caffe_schema  # type: ignore[attr-defined]
    except ImportError:
        raise SchemaError("caffetune's schema has not been generated",
                          fix="run `make setup` (or `make proto`), or pass --proto PATH/TO/caffe.proto") from None
    return _from_serialized(caffe_schema.FILE_DESCRIPTOR_SET, f"pinned Caffe source ({caffe_schema.SOURCE})",
                            caffe_schema.SHA256)


def load(proto: Path | str | None = None) -> Schema:
    """The schema to use: `proto`, else $CAFFETUNE_PROTO, else the pinned one."""
    chosen = proto or os.environ.get(PROTO_ENV)
    return load_from_proto(Path(chosen)) if chosen else load_pinned()


_current: Schema | None = None


def use(proto: Path | str | None = None) -> Schema:
    """Select the schema for this process (the CLI calls this once with --proto)."""
    global _current
    _current = load(proto)
    return _current


def current() -> Schema:
    """The schema in use; loads the default on first use."""
    return _current if _current is not None else use(None)
