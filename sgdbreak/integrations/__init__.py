"""The edge of the library: several processes (``collectives``, ``distributed_probe``,
``replica_noise``, ``accelerate``), run directories (``rundir``), summaries
(``summaries``), tracker loggers (``loggers``), figures (``plots``) and the ``sgdbreak``
command (``cli``). Optional packages are imported inside the functions that need them.
"""
