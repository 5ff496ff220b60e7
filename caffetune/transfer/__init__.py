"""Weight transfer: graft pretrained blobs onto a new net (Caffe's own name-and-shape matching), fillers for the
rest, and the linear-probe fit of new heads on the pretrained features."""
