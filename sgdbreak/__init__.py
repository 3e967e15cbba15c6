"""sgdbreak: online sharpness and gradient-noise tracking and break-even detection for SGD.

Implements the measurements of Jastrzebski et al., "The Break-Even Point on Optimization
Trajectories of Deep Neural Networks" (ICLR 2020). ``import sgdbreak`` pulls in torch,
numpy and scipy only; integrations (Accelerate, W&B, matplotlib) load lazily.
"""

from . import quantities, schedulers, triggers
from .breakeven import (
    BreakEvenDetector,
    BreakEvenResult,
    eq1_lhs,
    stability_ratio,
    stability_threshold,
)
from .errors import NonFiniteMeasurement
from .hessian import (
    HessianEigenResult,
    HessianOperator,
    HessianTraceResult,
    hessian_eigenvalues,
    hessian_trace,
)
from .linalg import (
    EigenResult,
    TraceResult,
    as_linear_operator,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
from .monitor import BreakEvenMonitor
from .noise import CovarianceSpectrum, covariance_spectrum, gradient_noise_scale, noise_metrics
from .optim import BreakEvenSGD
from .probe import Probe
from .quantities import (
    AlphaStar,
    BatchNormGamma,
    CurvatureVariance,
    GradientNoise,
    HessianTrace,
    MeasurementContext,
    Quantity,
    Sharpness,
    UpdateSharpness,
    default_quantities,
)
from .schedulers import MonitoredLR

__version__ = "0.1.0"

__all__ = [
    "AlphaStar",
    "BatchNormGamma",
    "CurvatureVariance",
    "GradientNoise",
    "HessianTrace",
    "MeasurementContext",
    "Quantity",
    "Sharpness",
    "UpdateSharpness",
    "default_quantities",
    "quantities",
    "BreakEvenDetector",
    "BreakEvenMonitor",
    "BreakEvenResult",
    "BreakEvenSGD",
    "CovarianceSpectrum",
    "EigenResult",
    "HessianEigenResult",
    "HessianOperator",
    "HessianTraceResult",
    "MonitoredLR",
    "NonFiniteMeasurement",
    "Probe",
    "TraceResult",
    "as_linear_operator",
    "covariance_spectrum",
    "eq1_lhs",
    "gradient_noise_scale",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "lanczos",
    "noise_metrics",
    "power_iteration",
    "schedulers",
    "stability_ratio",
    "stability_threshold",
    "triggers",
]
