"""Launchers: how a training run is started (in this process, many processes, torchrun, Slurm)."""
