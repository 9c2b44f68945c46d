"""Tests for the ``gan`` trainer (:mod:`ml.trainers.gan`) and its two-part optimizer and schedule,
with real components trained in this process: which parameters each update changes, what the
checkpoint holds, bad input refused in one line, a non-finite update.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ml.cli import main as ml_main
from ml.core.compose import build_objects, compose_config, config_to_save
from ml.core.config import conf_field
from ml.core.state import Phase, State
from ml.errors import ConfigError, NonFiniteLossError
from ml.models.base import BaseModel, BaseModelConfig
from ml.optimizers.gan import GanOptimizer, GanOptimizerConfig
from ml.tasks.gan import GanTask, GanTaskConfig
from ml.trainers.gan import GanTrainer

HERE = __name__  # the import path of this module, for `name: <module>:Class`


class TinyGan(BaseModel[BaseModelConfig]):
    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__(config)
        self.generator = nn.Linear(2, 2)
        self.discriminator = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))


# What the losses saw, in call order: which loss, which parameters could get gradients, and
# copies of both parts' weights at that moment.
CALLS: list[tuple[str, dict[str, bool], dict[str, torch.Tensor]]] = []


def _seen(model: nn.Module, which: str) -> None:
    trainable = {
        part: all(p.requires_grad for p in getattr(model, part).parameters())
        for part in ("generator", "discriminator")
    }
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    CALLS.append((which, trainable, weights))


@dataclass
class TinyGanTaskConfig(GanTaskConfig):
    nan_at_step: int | None = conf_field(None, help="The discriminator's loss is NaN at this step")


class TinyGanTask(GanTask[TinyGanTaskConfig]):
    """Real points on a line; the generator maps noise onto it."""

    def get_dataset(self, phase: Phase) -> Dataset:
        t = torch.linspace(-1, 1, 40).unsqueeze(1)
        return TensorDataset(torch.cat([t, 2 * t], dim=1))

    def discriminator_loss(self, model: nn.Module, batch: Any, state: State) -> torch.Tensor:
        _seen(model, "discriminator")
        gan, (real,) = cast(TinyGan, model), batch
        drawn = gan.generator(torch.randn_like(real))
        assert not drawn.requires_grad  # the generator is frozen: no graph into it
        real_logit, drawn_logit = gan.discriminator(real), gan.discriminator(drawn)
        loss = F.softplus(-real_logit).mean() + F.softplus(drawn_logit).mean()
        if state.num_steps + 1 == self.config.nan_at_step:
            loss = loss * float("nan")
        return loss

    def generator_loss(self, model: nn.Module, batch: Any, state: State) -> dict[str, torch.Tensor]:
        _seen(model, "generator")
        gan = cast(TinyGan, model)
        drawn = gan.generator(torch.randn(batch[0].shape[0], 2))
        return {
            "adversarial": F.softplus(-gan.discriminator(drawn)).mean(),
            "small": 1e-3 * drawn.pow(2).mean(),
        }


CONFIG = f"""\
model: {{name: "{HERE}:TinyGan"}}
task: {{name: "{HERE}:TinyGanTask", max_steps: 4, train_dl: {{batch_size: 8}}}}
optimizer:
  name: gan
  generator: {{name: sgd, lr: 0.1}}
  discriminator: {{name: adam, lr: 0.01}}
lr_scheduler:
  name: gan
  generator: {{name: cosine}}
  discriminator: {{name: constant}}
trainer: {{name: gan, discriminator_steps: 2, progress_bar: false}}
logger: [{{name: jsonl, write_every_n_steps: 1}}]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "gan.yaml"
    path.write_text(CONFIG)
    return path


def _train(config_file: Path, exp_dir: Path, *overrides: str) -> tuple[GanTrainer, Any]:
    """Composes, builds and trains as ``ml train`` does, keeping the objects."""
    root = compose_config([str(config_file)], [*overrides, f"trainer.exp_dir={exp_dir}"])
    objects = build_objects(root)
    saved = config_to_save(root)
    OmegaConf.resolve(root)
    trainer = GanTrainer(root.trainer)
    trainer.set_run_config(root, saved)
    trainer.add_loggers(objects.loggers)
    trainer.train(objects.model, objects.task, objects.optimizer, objects.lr_scheduler)
    return trainer, objects


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if k.startswith(part))


def test_each_update_changes_its_own_part_only_with_the_other_frozen(
    config_file: Path, tmp_path: Path
) -> None:
    CALLS.clear()
    _, objects = _train(
        config_file, tmp_path / "run", "task.max_steps=2", "lr_scheduler.generator.total_steps=10"
    )
    # Each step: two discriminator updates (a batch each), then one generator update.
    assert [which for which, _, _ in CALLS] == ["discriminator", "discriminator", "generator"] * 2
    for which, trainable, _ in CALLS:
        other = "generator" if which == "discriminator" else "discriminator"
        assert trainable == {which: True, other: False}, which
    weights = [w for _, _, w in CALLS] + [
        {n: p.detach().clone() for n, p in objects.model.named_parameters()}
    ]
    for i, (which, _, _) in enumerate(CALLS):  # between this loss and the next, only `which` moved
        other = "generator" if which == "discriminator" else "discriminator"
        assert not _same(weights[i], weights[i + 1], which), (i, which)
        assert _same(weights[i], weights[i + 1], other), (i, which)
    assert all(p.requires_grad for p in objects.model.parameters())  # unfrozen after training


def test_the_checkpoint_holds_both_optimizers_and_schedules_and_loads_with_weights_only(
    config_file: Path, tmp_path: Path
) -> None:
    trainer, objects = _train(config_file, tmp_path / "run")
    ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True)
    assert set(ckpt["optim"]) == set(ckpt["lr"]) == {"generator", "discriminator"}
    g_state, d_state = ckpt["optim"]["generator"], ckpt["optim"]["discriminator"]
    assert g_state["param_groups"][0]["momentum"] == 0  # sgd: the generator's own optimizer
    assert d_state["state"][0]["exp_avg"].shape == (4, 2)  # adam over the discriminator's weights
    assert sum(len(g["params"]) for g in g_state["param_groups"]) == 2
    assert sum(len(g["params"]) for g in d_state["param_groups"]) == 4
    # The generator's cosine schedule ends at task.max_steps (4): its last update's scale is 0.
    assert ckpt["lr"]["generator"] == {"lr_scale": 0.0}
    assert ckpt["lr"]["discriminator"] == {"lr_scale": 1.0}
    assert json.loads(ckpt["state"])["num_steps"] == 4
    assert trainer.finished
    # config.yaml holds each part whole, its schedule's length as a reference to task.max_steps.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optimizer"]["discriminator"]["beta1"] == 0.9
    assert "task.max_steps" in saved["lr_scheduler"]["generator"]["total_steps"]
    # Loading it into fresh objects restores both optimizers.
    fresh = build_objects(compose_config([str(config_file)], []))
    optims = fresh.optimizer.get_parts(
        {"generator": fresh.model.generator, "discriminator": fresh.model.discriminator}
    )
    scheds = fresh.lr_scheduler.get_parts(optims)
    state = trainer.load_checkpoint(trainer.ckpt_path, fresh.task, fresh.model, optims, scheds)
    assert state.num_steps == 4
    assert torch.equal(
        optims["discriminator"].state_dict()["state"][0]["exp_avg"], d_state["state"][0]["exp_avg"]
    )
    for name, p in fresh.model.named_parameters():
        assert torch.equal(p, dict(objects.model.named_parameters())[name]), name


def test_one_optimizer_section_gives_each_part_an_optimizer_of_its_own(
    config_file: Path, tmp_path: Path
) -> None:
    trainer, _ = _train(
        config_file, tmp_path / "run", "optimizer={name: adam, lr: 0.01}", "lr_scheduler={name: constant}"
    )
    ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["optim"]["generator"]["state"][0]["exp_avg"].shape == (2, 2)
    assert ckpt["optim"]["discriminator"]["state"][0]["exp_avg"].shape == (4, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.discriminator_steps=0", "trainer.discriminator_steps must be positive"),
        ("optimizer.generator.lr=fast", "optimizer.generator.lr"),
        ("optimizer.discriminator.name=gan", "optimizer.discriminator.name: name the discriminator's own"),
        ("lr_scheduler.generator.warmup=3", "lr_scheduler.generator.warmup"),
        ("model.name=tests.tiny:TinyModel", "needs a model with a `generator` submodule"),
        ("trainer.non_finite_loss=ignore", "trainer.non_finite_loss must be 'stop' or 'skip'"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    override: str,
    message: str,
    config_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ML_EXP_NAME", "gan")
    assert ml_main(["train", str(config_file), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not list((tmp_path / "runs").glob("*/run_*"))


def test_the_gan_optimizer_is_refused_by_a_trainer_of_one_optimizer() -> None:
    optimizer = GanOptimizer(GanOptimizerConfig(name="gan"))
    with pytest.raises(ConfigError, match=r"it is for trainer\.name=gan"):
        optimizer.get(nn.Linear(2, 2))


def test_a_non_finite_update_stops_the_run_naming_the_step_and_part(
    config_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(NonFiniteLossError, match=r"discriminator's update at step 2 \(loss nan"):
        _train(config_file, tmp_path / "stop", "task.nan_at_step=2")
    trainer, objects = _train(
        config_file, tmp_path / "skip", "task.nan_at_step=2", "trainer.non_finite_loss=skip"
    )
    ckpt = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True)
    assert ckpt["skipped_steps"] == 2  # both discriminator updates of step 2 (its two batches)
    records = [json.loads(line) for line in (trainer.log_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [
        (r["step"], r["metrics"].get("trainer/skipped_steps")) for r in records if r["phase"] == "train"
    ]
    assert logged[:3] == [(1, None), (2, 2), (3, 2)] and all(n == 2 for _, n in logged[1:])
    assert all(torch.isfinite(p).all() for p in objects.model.parameters())


def test_with_several_discriminator_updates_a_step_the_step_named_is_the_bad_update_s(tmp_path: Path) -> None:
    """Each discriminator update writes a row of the non-finite record; the step was computed from
    the row's place as if a row were a step: with 2 updates a step, step 3's NaN was named step 4
    (the other tests log every step, so the bad row was the first of its read)."""
    config = tmp_path / "gan.yaml"
    config.write_text(CONFIG.replace("write_every_n_steps: 1", "write_every_n_steps: 100"))
    with pytest.raises(NonFiniteLossError, match=r"discriminator's update at step 3 \(loss nan"):
        _train(config, tmp_path / "run", "task.nan_at_step=3", "task.max_steps=6")


def test_weights_an_update_overflowed_are_never_saved(config_file: Path, tmp_path: Path) -> None:
    """A learning rate that overflows the discriminator's weights: the GAN trainer checked losses and
    gradients only, skipped every later update and saved the infinite weights, exiting as if fine."""
    with pytest.raises(NonFiniteLossError, match="weights themselves are no longer finite"):
        _train(
            config_file, tmp_path / "run", "optimizer.discriminator.lr=1e39", "trainer.non_finite_loss=skip"
        )
    for path in (tmp_path / "run" / "checkpoints").glob("ckpt.*.pt"):
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()), path


class TinyGanWithAnUnusedWeight(TinyGan):
    """A discriminator weight no loss uses (as an auxiliary head): it never has a gradient."""

    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__(config)
        self.discriminator.register_parameter("unused", nn.Parameter(torch.zeros(3)))


class InfGradientInTheDiscriminator(TinyGanTask):
    """A finite loss whose gradient becomes infinite in ``discriminator.0`` from step 2 on."""

    def discriminator_loss(self, model: nn.Module, batch: Any, state: State) -> torch.Tensor:
        if state.num_steps + 1 == 2:
            cast(TinyGan, model).discriminator[0].weight.register_hook(lambda grad: grad * float("inf"))
        return super().discriminator_loss(model, batch, state)


def test_the_module_is_named_beside_a_weight_without_gradient(tmp_path: Path) -> None:
    """The gradient norms were kept only when every weight of the part had a gradient: one unused
    weight and no stop named its module."""
    config = tmp_path / "gan.yaml"
    config.write_text(
        CONFIG.replace(f'"{HERE}:TinyGan"', f'"{HERE}:TinyGanWithAnUnusedWeight"').replace(
            f'"{HERE}:TinyGanTask"', f'"{HERE}:InfGradientInTheDiscriminator"'
        )
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 2 .*non-finite gradient in `discriminator\.0`"):
        _train(config, tmp_path / "run")


MODES: list[tuple[str, bool, bool]] = []  # (phase, model, the discriminator's first layer)


class FrozenPartGanTask(TinyGanTask):
    """Keeps the discriminator's first layer in eval mode (as a user freezes a part); validates."""

    def on_training_start(self, state, model, optim, lr_sched) -> None:  # type: ignore[no-untyped-def]
        model.discriminator[0].eval()

    def discriminator_loss(self, model: nn.Module, batch: Any, state: State) -> torch.Tensor:
        MODES.append(("train", model.training, model.discriminator[0].training))
        return super().discriminator_loss(model, batch, state)

    def evaluate(self, model: nn.Module, state: State) -> dict[str, float]:
        MODES.append(("valid", model.training, model.discriminator[0].training))
        return {"zero": 0.0}


def test_validation_leaves_a_frozen_part_frozen(config_file: Path, tmp_path: Path) -> None:
    MODES.clear()
    _, objects = _train(
        config_file,
        tmp_path / "run",
        f"task.name={HERE}:FrozenPartGanTask",
        "task.max_steps=4",
        "trainer.valid_every_n_steps=1",
    )
    assert {modes for modes in MODES if modes[0] == "valid"} == {("valid", False, False)}
    training = [modes for modes in MODES if modes[0] == "train"]
    assert training and set(training) == {("train", True, False)}
    assert objects.model.training and not objects.model.discriminator[0].training


class LineGan(BaseModel[BaseModelConfig]):
    """Parts whose losses and gradients below are plain sums of the batch: ``D(x) = x``, ``G(z) = z``."""

    def __init__(self, config: BaseModelConfig) -> None:
        super().__init__(config)
        self.generator = nn.Linear(1, 1)
        self.discriminator = nn.Linear(1, 1, bias=False)
        for weight in (self.generator.weight, self.discriminator.weight):
            nn.init.ones_(weight)
        nn.init.zeros_(self.generator.bias)


DETERMINISTIC_SEEN: list[bool] = []  # torch.are_deterministic_algorithms_enabled() in each loss


class IndexGanTask(GanTask[GanTaskConfig]):
    """Real samples 0, 1, 2, 3, 4: what a loss logs is the mean of its batch (its gradient too)."""

    def get_dataset(self, phase: Phase) -> Dataset:
        return TensorDataset(torch.arange(5, dtype=torch.float32).unsqueeze(1))

    def discriminator_loss(self, model: nn.Module, batch: Any, state: State) -> dict[str, torch.Tensor]:
        DETERMINISTIC_SEEN.append(torch.are_deterministic_algorithms_enabled())
        gan, (x,) = cast(LineGan, model), batch
        self.logger.log_scalar("batch_value", x.mean(), namespace="train")
        gan.logger.log_scalar("seen", x.mean())  # the model's own logger (model/seen)
        # "a" is the batch mean and so is its gradient for the discriminator's weight (1).
        return {"a": gan.discriminator(x).mean(), "b": 100 * x.mean()}

    def generator_loss(self, model: nn.Module, batch: Any, state: State) -> dict[str, torch.Tensor]:
        gan, (x,) = cast(LineGan, model), batch
        self.logger.log_scalar("generator_batch_value", x.mean(), namespace="train")
        return {"adversarial": gan.discriminator(gan.generator(x)).mean(), "small": 10 * x.mean()}


def test_a_step_logs_the_batch_weighted_mean_of_its_discriminator_updates(tmp_path: Path) -> None:
    """Three discriminator updates on batches [0, 1], [2, 3], [4] (one step, the whole epoch): each
    value they log is the mean over the step's 5 samples (2.0), not the last batch's (4.0) nor the
    mean of the batch means (2.33); the generator's update (on the last batch, [4]) logs its own."""
    config = tmp_path / "gan.yaml"
    config.write_text(CONFIG)
    _train(
        config,
        tmp_path / "run",
        f"model.name={HERE}:LineGan",
        f"task={{name: '{HERE}:IndexGanTask', max_steps: 1}}",
        "task.train_dl={batch_size: 2, shuffle: false, drop_last: false}",
        "optimizer={name: sgd, lr: 0.0}",  # the weights stay at 1: the values depend on the data only
        "lr_scheduler={name: constant}",
        "trainer.discriminator_steps=3",
    )
    records = [
        json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1]
    metrics = records[0]["metrics"]
    assert metrics == pytest.approx(
        {
            "train/batch_value": 2.0,
            "model/seen": 2.0,
            "train/discriminator/a": 2.0,
            "train/discriminator/b": 200.0,
            "train/discriminator_loss": 202.0,
            "trainer/grad_norm_discriminator": 2.0,
            "train/generator_batch_value": 4.0,
            "train/generator/adversarial": 4.0,  # D(G(4)) = 4
            "train/generator/small": 40.0,
            "train/generator_loss": 44.0,
            "trainer/grad_norm_generator": math.sqrt(4.0**2 + 1.0),  # G's weight (x = 4) and bias (1)
            "trainer/lr_discriminator": 0.0,
            "trainer/lr_generator": 0.0,
            "trainer/epoch": 0.0,
        }
    )


def test_deterministic_kernels_hold_during_training_only(config_file: Path, tmp_path: Path) -> None:
    DETERMINISTIC_SEEN.clear()
    assert not torch.are_deterministic_algorithms_enabled()
    _train(
        config_file,
        tmp_path / "run",
        f"model.name={HERE}:LineGan",
        f"task={{name: '{HERE}:IndexGanTask', max_steps: 2, train_dl: {{batch_size: 2}}}}",
        "trainer.deterministic=true",
    )
    assert DETERMINISTIC_SEEN == [True] * 4  # two steps of two discriminator updates
    assert not torch.are_deterministic_algorithms_enabled()  # put back after training


class EvaluatingTinyGanTask(TinyGanTask):
    def evaluate(self, model: nn.Module, state: State) -> dict[str, float]:
        return {"score": float(state.num_steps)}


def test_continuing_a_finished_run_does_not_validate_its_last_step_again(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The final validation came after the loop's checkpoint of that step, which was not saved
    again: each continuation validated (and logged) the last step once more."""
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ML_EXP_NAME", "gan")
    args = [
        f"task.name={HERE}:EvaluatingTinyGanTask",
        "task.max_steps=4",
        "task.train_dl.batch_size=8",
        "trainer.valid_every_n_steps=3",
        "trainer.checkpoint.save_every_n_steps=2",
    ]
    assert ml_main(["train", str(config_file), *args]) == 0
    exp_dir = tmp_path / "runs" / "gan" / "run_0"
    for _ in range(2):
        assert ml_main(["train", str(exp_dir / "config.yaml")]) == 0
    records = [json.loads(line) for line in (exp_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["phase"] == "valid"] == [3, 4]


def test_changing_discriminator_steps_on_resume_is_refused(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It changes what each step trains on, as trainer.batches_per_step does for sl."""
    monkeypatch.setenv("RUN_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ML_EXP_NAME", "gan")
    assert ml_main(["train", str(config_file), "task.max_steps=1"]) == 0
    ckpt = tmp_path / "runs" / "gan" / "run_0" / "checkpoints" / "ckpt.pt"
    before = ckpt.resolve().read_bytes()
    capsys.readouterr()
    resumed = str(tmp_path / "runs" / "gan" / "run_0" / "config.yaml")
    assert ml_main(["train", resumed, "task.max_steps=2", "trainer.discriminator_steps=1"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trainer.discriminator_steps: 2 -> 1" in last and "--allow-config-change" in last, last
    assert ckpt.resolve().read_bytes() == before  # not trained on
