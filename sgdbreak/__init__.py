"""sgdbreak: online sharpness and gradient-noise tracking and break-even detection for SGD.

Implements the measurements of Jastrzebski et al., "The Break-Even Point on Optimization
Trajectories of Deep Neural Networks" (ICLR 2020). ``import sgdbreak`` pulls in torch,
numpy and scipy only; integrations (Accelerate, W&B, matplotlib) load lazily.
"""

__version__ = "0.1.0"
