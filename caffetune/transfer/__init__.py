"""Weight transfer: graft pretrained blobs onto a new net (Caffe's own name-and-shape matching), fillers for the
rest, and the linear-probe fit of new heads on the pretrained features."""
import importlib

# The public modules. Each is imported on first use (`caffetune.transfer.graft`), so importing the package costs
# nothing; `from caffetune.transfer import graft` works as usual.
__all__ = ["graft", "fillers", "head_fit", "trunk_cut", "feature_cache", "top_net"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
