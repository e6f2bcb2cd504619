"""Evaluation: bootstrap resampling of the task metrics (`bootstrap`), the `evaluate` step —
metrics per method, fold and pooled, and paired differences (`evaluation`) — and Markdown / LaTeX
tables (`tables`). The metrics themselves are `e2epath.metrics`, shared with training."""
