"""Frozen-encoder features for the two-stage baseline: extraction (`extraction`) and the feature
files (`files`)."""
