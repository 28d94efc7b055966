"""Esper: morphogenetic training for PyTorch: models that grow capacity where they need it."""

__version__ = "0.1.0"
