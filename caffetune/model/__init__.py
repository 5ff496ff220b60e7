"""Model files: Caffe's schema, prototxt text and its layout-preserving edits, the layer view (current and V1), the
classifier heads, shape inference, .caffemodel reading and writing, and finding and running the Caffe install.

Everything else reaches protobuf messages through here; `schema` is the only importer of the generated module."""
