"""Models: MIL aggregators (`aggregators.build_aggregator`), the E2E model (`e2e`), encoder presets
(`presets`: plain data, read when the workflow is parsed — so this package's `__init__` imports
nothing), architectures (`encoders`), checkpoint files (`checkpoints`) and the weights policy
(`weights.build_encoder`)."""
