"""Oracles, tiny problems, assertions and Hypothesis strategies for testing estimators.

What users and sgdbreak's own tests need to property-test curvature and gradient-noise
estimators (see docs/testing.md):

- oracles (:mod:`.oracles`): dense Hessians, matrices with chosen spectra, the gradient
  covariance K, Adam's preconditioned Hessian — slow, obvious, float64;
- tiny problems (:mod:`.problems`): small tanh models with data and a loss;
- assertions (:mod:`.assertions`): eigenvalue and spectrum comparisons whose failures
  name the worst entry;
- strategies (:mod:`sgdbreak.testing.strategies`): Hypothesis strategies drawing the
  above with known answers. It needs Hypothesis (``pip install 'sgdbreak[testing]'``)
  and is imported only on request: ``from sgdbreak.testing import strategies``.
"""

from .assertions import assert_eigenpairs, assert_eigenvalues_close, assert_spectrum_close
from .oracles import (
    adam_preconditioner,
    exact_hessian,
    gradient_covariance,
    model_hessian,
    per_example_covariance,
    per_example_gradients_by_loop,
    preconditioned_hessian,
    random_orthogonal,
    symmetric_matrix_with_spectrum,
)
from .problems import TinyProblem, tiny_problem

__all__ = [
    "TinyProblem",
    "adam_preconditioner",
    "assert_eigenpairs",
    "assert_eigenvalues_close",
    "assert_spectrum_close",
    "exact_hessian",
    "gradient_covariance",
    "model_hessian",
    "per_example_covariance",
    "per_example_gradients_by_loop",
    "preconditioned_hessian",
    "random_orthogonal",
    "symmetric_matrix_with_spectrum",
    "tiny_problem",
]


def __getattr__(name: str):
    # ``sgdbreak.testing.strategies`` after a plain ``import sgdbreak.testing``, without
    # importing Hypothesis before someone asks for it.
    if name == "strategies":
        import importlib

        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
