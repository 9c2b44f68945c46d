"""Which way a metric improves, read from its name (``ml runs``, the best checkpoints, early stopping)."""

import pytest

from ml.core.monitor import EarlyStopping, higher_is_better, mode_of
from ml.errors import ConfigError


@pytest.mark.parametrize(
    ("metric", "higher"),
    [
        ("valid/loss", False),
        ("valid/clean/accuracy", True),
        ("valid/acc", True),
        ("rl/eval_return", True),
        ("valid/f1", True),
        ("valid/auc", True),
        ("valid/iou", True),
        ("valid/precision", True),
        ("valid/recall", True),
        ("valid/bleu", True),
        ("valid/map", True),
        # a word of an error wins over a word of a score
        ("valid/reward_model_loss", False),
        ("valid/return_mse", False),
        ("valid/accel_error", False),
        ("valid/perplexity", False),
        ("valid/bits", False),  # unknown: lower, like a loss
    ],
)
def test_the_direction_comes_from_the_words_of_the_name(metric: str, higher: bool) -> None:
    assert higher_is_better(metric) is higher
    assert mode_of(metric, None, "x") == ("max" if higher else "min")


def test_a_mode_given_wins_and_a_bad_one_is_refused() -> None:
    assert mode_of("valid/f1", "min", "x") == "min"
    with pytest.raises(ConfigError, match=r"trainer\.checkpoint\.mode must be min or max"):
        mode_of("valid/loss", "lowest", "trainer.checkpoint.mode")


def test_early_stopping_counts_evaluations_without_improvement_by_more_than_min_delta() -> None:
    stopping = EarlyStopping("valid/loss", "min", patience=2, min_delta=0.1)
    for step, value in [(1, 1.0), (2, 0.95), (3, 0.85), (4, float("nan"))]:
        stopping.update(value, step)
    assert (stopping.best, stopping.best_step, stopping.bad_evaluations) == (0.85, 3, 1)
    assert not stopping.should_stop
    stopping.update(0.8, 5)
    assert stopping.should_stop and "best 0.85 at step 3" in stopping.reason


def test_early_stopping_continues_a_checkpoints_count_only_for_the_same_metric_and_direction() -> None:
    before = EarlyStopping("valid/acc", "min", patience=3)
    for step, value in [(1, 0.5), (2, 0.6), (3, 0.7)]:  # rising: 2 bad evaluations when lower is better
        before.update(value, step)
    same = EarlyStopping("valid/acc", "min", patience=3)
    same.load_state_dict(before.state_dict())
    assert (same.best, same.bad_evaluations) == (0.5, 2)
    flipped = EarlyStopping("valid/acc", "max", patience=3)  # the resumed run says higher is better
    flipped.load_state_dict(before.state_dict())
    assert (flipped.best, flipped.best_step, flipped.bad_evaluations) == (None, None, 0)
    older = {k: v for k, v in before.state_dict().items() if k != "mode"}  # a checkpoint without the key
    same.load_state_dict(older)
    assert (same.best, same.bad_evaluations) == (0.5, 2)
