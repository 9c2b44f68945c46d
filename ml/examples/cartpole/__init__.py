"""The packaged ``cartpole`` config: PPO on CartPole-v1 (``ml train cartpole``); code in ``ml.examples.classic_control``."""
