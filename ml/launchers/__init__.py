"""Launchers: how a training run is started (in this process; several, by torchrun or by ``mp``; Slurm).

Beside them, :mod:`ml.launchers.sweep` turns a command line into a sweep's runs (``-m``, a
``sweep:`` section), and :mod:`ml.launchers.stage` copies a run's code into its folder for a job
that starts later.
"""
