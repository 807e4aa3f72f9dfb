"""`evaluate` and `predict`: a checkpoint over a split or over images and videos."""
