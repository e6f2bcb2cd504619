"""Evaluation: metrics shared with training (`metrics`), bootstrapped intervals and paired
differences (`bootstrap`, the `evaluate` step) and Markdown / LaTeX tables (`tables`)."""
