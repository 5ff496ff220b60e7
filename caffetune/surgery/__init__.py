"""Net surgery: rewrite a pretrained net for N classes (heads renamed and resized), net edits, deploy <-> train_val
derivation, the learning-rate policy (plan, then apply) and solver edits. Pure functions over NetParameter messages:
each returns a new message and leaves the caller's untouched."""
import importlib

# The public modules. Each is imported on first use (`caffetune.surgery.rewrite`), so importing the package costs
# nothing; `from caffetune.surgery import rewrite` works as usual.
__all__ = ["rewrite", "net_edits", "derive", "lr_policy", "solver", "class_layers"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
