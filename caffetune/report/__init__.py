"""Reports: `inspect` (a net and its weights), `draw` (the net as a graph), `eval` (a deploy net on a labelled
dataset) and `doctor` (what caffetune will use)."""
import importlib

# The public modules. Each is imported on first use (`caffetune.report.inspection`), so importing the package costs
# nothing; `from caffetune.report import inspection` works as usual.
__all__ = ["inspection", "draw", "evaluate", "doctor"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
