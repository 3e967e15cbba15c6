"""Shared code of the recipes: the command line, data and models, the training loop, the grid.

Every recipe under ``recipes/`` is a thin script: a :class:`~recipekit.grid.Recipe` (its
defaults, measurements, table columns and analysis) handed to :func:`~recipekit.grid.main`.
Nothing here is part of the ``sgdbreak`` package; a recipe puts this folder on ``sys.path``
by being run from it (``python recipes/x.py`` and ``accelerate launch recipes/x.py`` both do).
"""

from .args import build_parser
from .grid import Column, Recipe, RunSpec, main, run_name

__all__ = ["Column", "Recipe", "RunSpec", "build_parser", "main", "run_name"]
