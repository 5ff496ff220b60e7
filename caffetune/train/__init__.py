"""Training: preflight checks, the run directory, launching and watching the real `caffe train`, two-stage runs,
Caffe log parsing, metrics files and plots."""
import importlib

# The public modules. Each is imported on first use (`caffetune.train.preflight`), so importing the package costs
# nothing; `from caffetune.train import preflight` works as usual.
__all__ = ["preflight", "runner", "session", "stages", "events", "run_dir", "logparse", "metrics", "plots", "sweep"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
