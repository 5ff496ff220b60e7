"""Data: image lists, images <-> Datums, LMDB reading and writing, the dataset mean, the worker pool, and
`build-lmdb` (an image list -> train/val LMDBs, labels and mean)."""
