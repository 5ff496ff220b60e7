"""Training: preflight checks, the run directory, launching and watching the real `caffe train`, two-stage runs,
Caffe log parsing, metrics files and plots."""
