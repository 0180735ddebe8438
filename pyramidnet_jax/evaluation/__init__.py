"""Evaluation: a network on a split, the report, and classifying image files."""
