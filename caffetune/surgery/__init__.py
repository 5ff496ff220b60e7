"""Net surgery: rewrite a pretrained net for N classes (heads renamed and resized), net edits, deploy <-> train_val
derivation, the learning-rate policy (plan, then apply) and solver edits. Pure functions over NetParameter messages:
each returns a new message and leaves the caller's untouched."""
