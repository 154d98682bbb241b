"""Sandbox layers: one module per layer, all implementing ``backends.base``."""
