"""The small-scale reproduction study (experiments.reproduce): presets, corpus, per-model
evaluation and the report."""
