"""Sparse Matrix Tuning: see method.py; the layer, scoring, selection and optimizer live beside it."""
from .method import SMT

__all__ = ["SMT"]
