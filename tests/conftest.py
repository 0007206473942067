"""Shared test settings: float32 CPU, deterministic."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
