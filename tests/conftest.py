"""Shared pytest fixtures: real local servers (HTTP, S3) live in tests/helpers/."""

from __future__ import annotations

import os

# Quiet TensorFlow's C++ logging before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
