"""Oracles and Hypothesis strategies for testing sgdbreak and code built on it."""

from .oracles import exact_hessian, model_hessian, symmetric_matrix_with_spectrum

__all__ = ["exact_hessian", "model_hessian", "symmetric_matrix_with_spectrum"]
