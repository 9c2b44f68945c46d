"""Trainers: the base trainer of the spec, and the supervised and reinforcement-learning loops."""
