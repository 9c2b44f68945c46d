"""``ml``: a PyTorch training framework.

The public names below are imported on first use, so ``import ml`` stays cheap (it does not import
torch until something that needs it is touched).
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "BaseConfig": "ml.core.config",
    "BaseObject": "ml.core.config",
    "conf_field": "ml.core.config",
    "MISSING": "ml.core.config",
    "State": "ml.core.state",
    "register_model": "ml.core.registry",
    "register_task": "ml.core.registry",
    "register_trainer": "ml.core.registry",
    "register_optimizer": "ml.core.registry",
    "register_lr_scheduler": "ml.core.registry",
    "register_logger": "ml.core.registry",
    "register_launcher": "ml.core.registry",
    "BaseModel": "ml.models.base",
    "BaseModelConfig": "ml.models.base",
    "BaseTask": "ml.tasks.base",
    "BaseTaskConfig": "ml.tasks.base",
    "SupervisedLearningTask": "ml.tasks.sl",
    "SupervisedLearningTaskConfig": "ml.tasks.sl",
    "BaseTrainer": "ml.trainers.base",
    "BaseTrainerConfig": "ml.trainers.base",
    "CheckpointConfig": "ml.trainers.base",
    "SupervisedLearningTrainer": "ml.trainers.sl",
    "SupervisedLearningTrainerConfig": "ml.trainers.sl",
    "BaseLogger": "ml.loggers.base",
    "MultiLogger": "ml.loggers.base",
    "BaseLRScheduler": "ml.lr_schedulers.base",
    "SchedulerAdapter": "ml.lr_schedulers.base",
    "BaseOptimizer": "ml.optimizers.base",
    "load_model": "ml.models.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ml' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
