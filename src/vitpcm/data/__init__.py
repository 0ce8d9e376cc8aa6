"""Datasets: download, label parsing, TFRecord conversion and reading, synthetic data."""
