"""The packaged ``pendulum`` config: PPO on Pendulum-v1 (``ml train pendulum``); code in ``ml.examples.classic_control``."""
