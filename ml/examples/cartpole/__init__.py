"""The packaged ``cartpole`` config: PPO on CartPole-v1 (``ml train cartpole``).

The code lives in ``ml.examples.classic_control``.
"""
