"""Model files: Caffe's schema, prototxt text and its layout-preserving edits, the layer view (current and V1), the
classifier heads, shape inference, .caffemodel reading and writing, and finding and running the Caffe install.

Everything else reaches protobuf messages through here; `schema` is the only importer of the generated module."""
import importlib

# The public modules. Each is imported on first use (`caffetune.model.schema`), so importing the package costs
# nothing; `from caffetune.model import schema` works as usual.
__all__ = ["schema", "prototxt", "textedit", "layers", "heads", "shapes", "caffemodels", "wire", "caffe_tools",
           "upgrade"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
