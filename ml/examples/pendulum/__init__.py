"""The packaged ``pendulum`` config: PPO on Pendulum-v1 (``ml train pendulum``).

The code lives in ``ml.examples.classic_control``.
"""
