"""The paper's models and offline data sets (``models``, ``datasets``), for the recipes and
benchmarks; the library core does not use them.
"""
