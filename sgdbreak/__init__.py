"""sgdbreak: online sharpness and gradient-noise tracking and break-even detection for SGD and Adam.

Implements the measurements of Jastrzebski et al., "The Break-Even Point on Optimization
Trajectories of Deep Neural Networks" (ICLR 2020). ``import sgdbreak`` pulls in torch,
numpy and scipy only; integrations (Accelerate, W&B, matplotlib) load lazily.

Layout (one-way dependencies, top to bottom):

* ``estimators``: pure functions on a loss closure or gradient samples (Lanczos,
  Hutchinson, Hessian-vector products, the noise spectrum K);
* ``measurement``: the probe, quantities (what to measure), triggers (when), the
  monitor and the break-even detector;
* ``optim``: ``BreakEvenSGD``, ``BreakEvenAdam``/``BreakEvenAdamW`` and the schedulers that read the monitor;
* ``integrations``: several processes (Accelerate), run directories, trackers,
  figures and the command line;
* ``workloads``: the paper's models and offline data sets, for recipes and benchmarks;
* ``testing``: oracles and Hypothesis strategies for users' tests.
"""

from .errors import NonFiniteMeasurement
from .estimators.hessian import (
    HessianEigenResult,
    HessianOperator,
    HessianTraceResult,
    hessian_eigenvalues,
    hessian_trace,
)
from .estimators.linalg import (
    EigenResult,
    TraceResult,
    as_linear_operator,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
from .estimators.noise import (
    CovarianceSpectrum,
    covariance_spectrum,
    gradient_noise_scale,
    noise_metrics,
)
from .integrations.accelerate import prepare_monitor
from .integrations.accumulation import BreakEvenAccumulation
from .integrations.collectives import check_world_size, is_main_process
from .integrations.distributed_probe import DistributedProbe
from .integrations.replica_noise import ReplicaNoise
from .integrations.rundir import Run, RunLog, read_run
from .measurement import quantities, triggers
from .measurement.breakeven import (
    BreakEvenDetector,
    BreakEvenResult,
    eq1_lhs,
    stability_ratio,
    stability_threshold,
)
from .measurement.monitor import BreakEvenMonitor
from .measurement.probe import Probe
from .measurement.quantities import (
    AlphaStar,
    BatchNormGamma,
    CurvatureVariance,
    GradientNoise,
    HessianTrace,
    MeasurementContext,
    PreconditionedSharpness,
    Quantity,
    Sharpness,
    UpdateSharpness,
    default_quantities,
)
from .optim import schedulers
from .optim.adam import BreakEvenAdam, BreakEvenAdamW
from .optim.batch_sampler import BreakEvenBatchSampler
from .optim.batch_size import BatchSizeController
from .optim.schedulers import MonitoredLR
from .optim.sgd import BreakEvenSGD
from .optim.suggest import EdgeEstimate, edge_learning_rate, suggest_lr
from .optim.warmup import BreakEvenWarmup

__version__ = "0.2.0"

__all__ = [
    "AlphaStar",
    "BatchSizeController",
    "BatchNormGamma",
    "BreakEvenAccumulation",
    "BreakEvenAdam",
    "BreakEvenAdamW",
    "BreakEvenBatchSampler",
    "BreakEvenDetector",
    "BreakEvenMonitor",
    "BreakEvenResult",
    "BreakEvenSGD",
    "BreakEvenWarmup",
    "EdgeEstimate",
    "CovarianceSpectrum",
    "CurvatureVariance",
    "DistributedProbe",
    "EigenResult",
    "GradientNoise",
    "HessianEigenResult",
    "HessianOperator",
    "HessianTrace",
    "HessianTraceResult",
    "MeasurementContext",
    "MonitoredLR",
    "NonFiniteMeasurement",
    "PreconditionedSharpness",
    "Probe",
    "Quantity",
    "ReplicaNoise",
    "Run",
    "RunLog",
    "Sharpness",
    "TraceResult",
    "UpdateSharpness",
    "as_linear_operator",
    "check_world_size",
    "covariance_spectrum",
    "default_quantities",
    "edge_learning_rate",
    "eq1_lhs",
    "gradient_noise_scale",
    "hessian_eigenvalues",
    "hessian_trace",
    "hutchinson_trace",
    "is_main_process",
    "lanczos",
    "noise_metrics",
    "power_iteration",
    "prepare_monitor",
    "quantities",
    "read_run",
    "schedulers",
    "stability_ratio",
    "stability_threshold",
    "suggest_lr",
    "triggers",
]
