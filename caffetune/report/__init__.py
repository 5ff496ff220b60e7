"""Reports: `inspect` (a net and its weights), `draw` (the net as a graph), `eval` (a deploy net on a labelled
dataset) and `doctor` (what caffetune will use)."""
