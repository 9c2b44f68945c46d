"""Optimizers: :class:`BaseOptimizer` builds a ``torch.optim.Optimizer`` for a model."""
