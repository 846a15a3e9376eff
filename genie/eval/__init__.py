"""Evaluation: metrics and the `genie eval` runner."""
