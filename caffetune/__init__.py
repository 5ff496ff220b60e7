"""caffetune: fine-tune pretrained Caffe models on new image datasets, safely and repeatably."""
__version__ = "0.1.0"
