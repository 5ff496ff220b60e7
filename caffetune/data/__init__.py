"""Data: image lists, images <-> Datums, LMDB reading and writing, the dataset mean, the worker pool, and
`build-lmdb` (an image list -> train/val LMDBs, labels and mean)."""
import importlib

# The public modules. Each is imported on first use (`caffetune.data.imagelist`), so importing the package costs
# nothing; `from caffetune.data import imagelist` works as usual.
__all__ = ["imagelist", "datum", "lmdb_reader", "lmdb_writer", "mean", "dataset"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
