"""The embedded demo model's data and yardstick: procedural captioned shape scenes (scenes), a training-set
writer (make_dataset), an image-analysis attribute detector (detector) and evaluation scores (evaluate)."""
