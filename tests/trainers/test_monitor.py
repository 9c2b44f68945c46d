"""Training by a metric, from Python: the best checkpoints (``trainer.checkpoint.monitor``),
early stopping (``trainer.early_stopping``) and the moving average of the weights (``trainer.ema``).

The monitored metric is scripted (the task logs a given value at each validation), so that which
checkpoint is best and when patience runs out are known exactly.
"""

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ml.core.state import State
from ml.errors import BadInput, ConfigError
from ml.lr_schedulers.builtin import ConstantConfig, ConstantLRScheduler
from ml.optimizers.builtin import AdamConfig, AdamOptimizer
from ml.tasks.sl import SupervisedLearningTaskConfig
from ml.tools.export import main as export_main
from ml.trainers.sl import SupervisedLearningTrainer, SupervisedLearningTrainerConfig
from tests.tiny import TinyModel, TinyModelConfig, TinyTask

# valid/score at each validation (every 2 steps), by step
SCRIPT = {2: 1.0, 4: 0.5, 6: 0.6, 8: 0.45, 10: 0.7, 12: 0.8, 14: 0.3, 16: 0.9}


class ScriptedTask(TinyTask):
    """Logs ``valid/score`` from :data:`SCRIPT`; sends itself SIGTERM after step ``stop_at``."""

    stop_at: int | None = None
    weights: dict[int, dict[str, torch.Tensor]]

    def compute_loss(
        self, model: nn.Module, batch: tuple, state: State, output: torch.Tensor
    ) -> torch.Tensor:
        if state.phase == "valid":
            self.logger.log_scalar("score", SCRIPT.get(state.num_steps, 5.0), namespace="valid")
        return F.cross_entropy(output, batch[1])

    def on_step_end(self, state: State, loss_dict: Any, model: nn.Module, optim: Any, lr_sched: Any) -> None:
        self.weights = getattr(self, "weights", {})
        self.weights[state.num_steps] = {k: v.clone() for k, v in model.state_dict().items()}
        if state.num_steps == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


def _train(
    exp_dir: Path, max_steps: int = 16, stop_at: int | None = None, **trainer: Any
) -> SupervisedLearningTrainer:
    config = OmegaConf.merge(
        OmegaConf.structured(SupervisedLearningTrainerConfig),
        {"name": "sl", "exp_dir": str(exp_dir), "valid_every_n_steps": 2, "test_at_end": False, **trainer},
    )
    sl = SupervisedLearningTrainer(config)  # type: ignore[arg-type]
    task = ScriptedTask(SupervisedLearningTaskConfig(name="tiny", max_steps=max_steps))
    task.stop_at = stop_at
    torch.manual_seed(0)
    model = TinyModel(TinyModelConfig(name="tiny"))
    sl.train(
        model,
        task,
        AdamOptimizer(AdamConfig(name="adam", lr=1e-2)),
        ConstantLRScheduler(ConstantConfig(name="c")),
    )
    sl.task = task  # type: ignore[attr-defined]
    return sl


def _steps(exp_dir: Path) -> list[int]:
    return sorted(int(p.name.split(".")[1]) for p in (exp_dir / "checkpoints").glob("ckpt.*.pt"))


def test_the_best_k_checkpoints_by_the_monitor_are_kept_with_best_pt(tmp_path: Path) -> None:
    _train(tmp_path, checkpoint={"monitor": "valid/score", "keep_top_k": 2})
    # Best two of SCRIPT: 14 (0.3) and 8 (0.45); 16 is the latest. best.pt names 14.
    assert _steps(tmp_path) == [8, 14, 16]
    assert os.readlink(tmp_path / "checkpoints" / "best.pt") == "ckpt.14.pt"
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["score"] == {"metric": "valid/score", "value": 0.3}
    scores = json.loads((tmp_path / "checkpoints" / "scores.json").read_text())
    assert scores == {"monitor": "valid/score", "mode": "min", "scores": {"14": 0.3, "8": 0.45}}


def test_mode_max_keeps_the_highest(tmp_path: Path) -> None:
    _train(tmp_path, max_steps=6, checkpoint={"monitor": "valid/score", "mode": "max"})
    assert _steps(tmp_path) == [2, 6] and os.readlink(tmp_path / "checkpoints" / "best.pt") == "ckpt.2.pt"


def test_early_stopping_ends_the_run_as_finished_and_a_resume_keeps_the_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stopping = {"monitor": "valid/score", "patience": 2, "min_delta": 0.1}
    trainer = _train(tmp_path, early_stopping=stopping)
    # 4 improves on 2 by more than 0.1; 6 and 8 do not (8's 0.45 is not below 0.5 - 0.1): stop at 8.
    assert trainer.finished and trainer.stop_reason is not None
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 8
    assert status["reason"] == (
        "early stopping: valid/score did not improve by more than 0.1 in 2 evaluations "
        "(patience 2; best 0.5 at step 4)"
    )
    ckpt = torch.load(tmp_path / "checkpoints" / "ckpt.pt", weights_only=True)
    assert ckpt["early_stopping"]["bad_evaluations"] == 2 and "test/loss" not in ckpt["final_metrics"]

    again = _train(tmp_path, early_stopping=stopping)  # the same settings: nothing left to do
    assert again.finished and json.loads((tmp_path / "status.json").read_text())["step"] == 8
    assert "nothing more to train (raise trainer.early_stopping.patience to go on)" in caplog.text

    # One more evaluation of patience: 10 (0.7) is the third without improvement, so it stops at 10,
    # not at 14 as it would with the count started over.
    longer = _train(tmp_path, early_stopping={**stopping, "patience": 3})
    assert longer.finished and json.loads((tmp_path / "status.json").read_text())["step"] == 10


def test_a_monitor_that_validation_does_not_give_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"valid/nope is not among the evaluation's metrics \(valid/loss, valid/score\)"
    ):
        _train(tmp_path / "a", early_stopping={"monitor": "valid/nope"})
    # Found at the first validation, after training: kept for a resume, and the run failed.
    assert _steps(tmp_path / "a") == [2]
    status = json.loads((tmp_path / "a" / "status.json").read_text())
    assert status["state"] == "failed" and "valid/nope" in status["error"]
    with pytest.raises(
        ConfigError, match=r"needs evaluations during training: set trainer\.valid_every_n_steps"
    ):
        _train(tmp_path / "b", valid_every_n_steps=None, checkpoint={"monitor": "valid/loss"})
    assert not (tmp_path / "b").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="is not an evaluation metric: name one starting with valid/"):
        _train(tmp_path / "c", checkpoint={"monitor": "train/loss"})
    with pytest.raises(ConfigError, match=r"trainer\.checkpoint\.mode must be min or max"):
        _train(tmp_path / "d", checkpoint={"monitor": "valid/loss", "mode": "lowest"})
    with pytest.raises(ConfigError, match=r"trainer\.ema\.decay must be in"):
        _train(tmp_path / "e", ema={"decay": 1.0})
    with pytest.raises(ConfigError, match=r"trainer\.early_stopping\.patience must be positive"):
        _train(tmp_path / "f", early_stopping={"monitor": "valid/loss", "patience": 0})
    # One metric judged both ways: the best checkpoint would be the one early stopping gives up on.
    with pytest.raises(
        ConfigError,
        match=r"trainer\.checkpoint\.mode=max and trainer\.early_stopping\.mode=min judge valid/score "
        r"in opposite directions: give both the same mode",
    ):
        _train(
            tmp_path / "g",
            checkpoint={"monitor": "valid/score", "mode": "max"},
            early_stopping={"monitor": "valid/score", "mode": "min"},
        )
    assert not any((tmp_path / name).exists() for name in "bcdefg")


def _expected_average(weights: dict[int, dict[str, torch.Tensor]], decay: float, steps: list[int]) -> dict:
    average = {k: v.clone() for k, v in weights[steps[0]].items()}
    for step in steps[1:]:
        for key, value in weights[step].items():
            if value.is_floating_point():
                average[key] = decay * average[key] + (1 - decay) * value
            else:
                average[key] = value.clone()
    return average


def test_the_moving_average_is_exact_resumes_exactly_and_can_be_validated(tmp_path: Path) -> None:
    ema = {"decay": 0.75, "start_step": 3, "every_n_steps": 2}
    whole = _train(tmp_path / "whole", max_steps=10, ema=ema)
    assert whole.ema is not None and whole.ema.num_updates == 4  # steps 3, 5, 7, 9
    expected = _expected_average(whole.task.weights, 0.75, [3, 5, 7, 9])  # type: ignore[attr-defined]
    for key, value in whole.ema.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
    assert not torch.equal(whole.ema.model.net[0].weight, whole.task.weights[10]["net.0.weight"])  # type: ignore[attr-defined]

    _train(tmp_path / "split", max_steps=10, stop_at=6, ema=ema)  # SIGTERM after step 6, then resumed
    split = _train(tmp_path / "split", max_steps=10, ema=ema)
    saved = torch.load(tmp_path / "whole" / "checkpoints" / "ckpt.pt", weights_only=True)["ema"]
    resumed = torch.load(tmp_path / "split" / "checkpoints" / "ckpt.pt", weights_only=True)["ema"]
    assert saved["num_updates"] == resumed["num_updates"] == 4
    assert all(torch.equal(saved["weights"][k], v) for k, v in resumed["weights"].items())
    assert split.final_metrics["valid/loss"] == whole.final_metrics["valid/loss"]

    _train(tmp_path / "plain", max_steps=2)  # (exporting the average: tests/e2e/test_cli.py)
    with pytest.raises(BadInput, match="holds no moving average of the weights"):
        export_main([str(tmp_path / "plain"), "-o", str(tmp_path / "plain.safetensors"), "--ema"])

    # An average that has not begun is the untrained copy: the trained weights are validated, and
    # there is nothing to export.
    late = _train(tmp_path / "late", max_steps=10, ema={**ema, "start_step": 50, "use_for_eval": True})
    assert late.ema is not None and late.ema.num_updates == 0
    assert late.final_metrics["valid/loss"] == whole.final_metrics["valid/loss"]
    with pytest.raises(BadInput, match="the moving average has not started by step 10"):
        export_main([str(tmp_path / "late"), "-o", str(tmp_path / "late.safetensors"), "--ema"])

    evaluated = _train(tmp_path / "eval", max_steps=10, ema={**ema, "use_for_eval": True})
    assert evaluated.ema is not None
    x, y = evaluated.task.get_dataset("valid").tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        of_average = F.cross_entropy(evaluated.ema.model(x), y).item()
    assert evaluated.final_metrics["valid/loss"] == pytest.approx(of_average, rel=1e-5)
    assert evaluated.final_metrics["valid/loss"] != whole.final_metrics["valid/loss"]


def test_settings_without_their_switch_are_not_ignored_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _train(
        tmp_path,
        max_steps=2,
        ema={"use_for_eval": True},
        early_stopping={"patience": 5, "min_delta": 0.1},
        checkpoint={"keep_top_k": 3},
    )
    assert "trainer.ema.use_for_eval: set without trainer.ema.decay, so ignored" in caplog.text
    assert (
        "trainer.early_stopping.patience, trainer.early_stopping.min_delta: set without "
        "trainer.early_stopping.monitor, so ignored" in caplog.text
    )
    assert "trainer.checkpoint.keep_top_k: set without trainer.checkpoint.monitor, so ignored" in caplog.text
