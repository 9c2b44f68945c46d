"""Tests for :mod:`ml.core.compose`: merge order, validation errors, packaged configs, building."""

import os
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ml.core.compose import (
    PACKAGED_CONFIGS,
    ConfigError,
    build_objects,
    compose_config,
    config_fields,
    find_config_file,
    set_default_exp_name,
)
from ml.core.config import EXP_NAME_ENV

BASE = """\
model: {name: digits_mlp, hidden: 32}
task: {name: digits, max_steps: 100}
optimizer: {name: adam, lr: 0.01}
trainer: {name: sl, exp_name: composed}
logger: [{name: stdout}]
"""


def _write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def base(tmp_path: Path) -> str:
    return _write(tmp_path / "base.yaml", BASE)


def test_defaults_fill_sections_and_fields(base: str) -> None:
    root = compose_config([base])
    assert root.model.hidden == 32
    assert root.model.num_layers == 2  # from DigitsMLPConfig
    assert root.lr_scheduler.name == "constant"  # from the framework defaults
    assert root.launcher.name == "single"
    assert [node.name for node in root.logger] == ["stdout"]  # a YAML list replaces the default
    assert root.trainer.checkpoint.save_every_n_seconds == 3600.0
    assert OmegaConf.is_missing(root.trainer, "exp_dir")  # filled when the run folder is claimed


def test_later_files_win_and_overrides_win_last(base: str, tmp_path: Path) -> None:
    second = _write(
        tmp_path / "second.yaml",
        """\
        model: {hidden: 64}
        optimizer: {lr: 0.5, weight_decay: 0.1}
        """,
    )
    root = compose_config([base, second])
    assert root.model.hidden == 64
    assert root.optimizer.lr == 0.5
    assert root.optimizer.weight_decay == 0.1
    assert root.task.max_steps == 100  # untouched by the second file

    root = compose_config([base, second], ["optimizer.lr=3e-4", "model.hidden=8", "task.max_steps=7"])
    assert root.optimizer.lr == 3e-4
    assert root.model.hidden == 8
    assert root.task.max_steps == 7
    assert root.optimizer.weight_decay == 0.1

    # The order of files matters: the base given last wins over the second file.
    assert compose_config([second, base]).model.hidden == 32


def test_changing_a_component_takes_its_own_defaults(base: str) -> None:
    root = compose_config([base], ["optimizer.name=sgd", "optimizer.lr=0.1"])
    from ml.optimizers.builtin import SGDConfig

    assert OmegaConf.get_type(root.optimizer) is SGDConfig
    assert root.optimizer.lr == 0.1


def test_packaged_config_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no local file called `digits`
    path = find_config_file("digits")
    assert path == PACKAGED_CONFIGS / "digits" / "config.yaml"
    assert path.read_text().startswith("# ml train digits")
    root = compose_config(["digits"], ["task.max_steps=3"])
    assert root.model.name == "digits_cnn"
    assert root.task.max_steps == 3


def test_a_run_folder_stands_for_its_config(tmp_path: Path) -> None:
    run = tmp_path / "run_0"
    run.mkdir()
    _write(run / "config.yaml", BASE)
    assert find_config_file(str(run)) == run / "config.yaml"


def test_a_moved_run_config_continues_in_its_new_folder(tmp_path: Path) -> None:
    run = tmp_path / "moved" / "run_3"
    (run / "checkpoints").mkdir(parents=True)
    config = BASE.replace("exp_name: composed", "exp_name: composed, exp_dir: /gone/run_3")
    path = _write(run / "config.yaml", config)
    assert compose_config([path]).trainer.exp_dir == str(run.resolve())

    # Without checkpoints there is nothing to continue: the written exp_dir stays.
    other = tmp_path / "other" / "run_0"
    other.mkdir(parents=True)
    path = _write(other / "config.yaml", config)
    assert compose_config([path]).trainer.exp_dir == "/gone/run_3"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lrr=1"], "optimizer.lrr: Key 'lrr' not in 'AdamConfig'"),
        (["trainer.checkpoint.save_every=1"], "trainer.checkpoint.save_every: Key 'save_every' not in"),
        (["task.max_steps=abc"], "task.max_steps: Value 'abc'"),
        (["trainer.valid_at_end=maybe"], "trainer.valid_at_end: Value 'maybe'"),
        (
            ["optimizer.name=adamx"],
            "optimizer.name: unknown optimizer 'adamx'; "
            "registered: adam, adamw, adan, gan, lamb, lion, prodigy, sgd, shampoo",
        ),
        (["model.name=no_such_module_x:Model"], "model.name: model 'no_such_module_x:Model': cannot import"),
        (["foo.bar=1"], "unknown section 'foo'"),
        (["=3"], "bad override '=3'"),
        (["task=3"], "section 'task' must be a mapping"),
        (["logger=3"], "section 'logger' must be a list"),
        (["optimizer.lr=${nope}"], "optimizer.lr: "),
        (["model.name="], "model.name is required"),
        (  # a list where the config has a section: the line shows a key of it
            ["model.hidden=4", "optimizer=[1,2]"],
            "optimizer=[1,2]: optimizer is a mapping, not a list: set its keys, e.g. optimizer.name=adam",
        ),
        (  # a key of the logger list: the line shows the list
            ["logger.name=jsonl"],
            "logger.name=jsonl: logger is a list of loggers (stdout), not a mapping: "
            "write 'logger=[{name: jsonl}]'",
        ),
        (  # OmegaConf said "Cannot convert 'DictConfig' to string"
            ["trainer.device=cuda:"],
            "trainer.device takes a single value, but was given the mapping {cuda: null} (in YAML, a "
            "word that ends in ':' is a key): write the value whole, or quote it",
        ),
        (
            ["trainer.checkpoint.save_every_n_steps=[1,2]"],
            "trainer.checkpoint.save_every_n_steps takes a single value, but was given the list [1, 2]",
        ),
        (  # a mapping where a component takes a list, and a list for a mapping: a TypeError, traced
            ["launcher.name=slurm", "launcher.extra_args={mem: 4G}"],
            "launcher.extra_args takes a list (default []), not the mapping {mem: 4G}",
        ),
        (
            ["optimizer.name=gan", "optimizer.generator=[1]"],
            "optimizer.generator takes a mapping (default {name: adam}), not the list [1]",
        ),
        (  # a whole sweep section: compose would drop it
            ["sweep={optimizer.lr: [1,2]}"],
            "a sweep is not a key=value override (it would be ignored): sweep on the command line with -m ",
        ),
    ],
)
def test_bad_overrides_name_the_key(base: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config([base], overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_section_in_a_file(base: str, tmp_path: Path) -> None:
    extra = _write(tmp_path / "extra.yaml", "optimiser: {lr: 1}\n")
    with pytest.raises(ConfigError, match="unknown section 'optimiser'; sections are: model, task"):
        compose_config([base, extra])


def test_unknown_key_in_a_file_names_the_dotted_key(base: str, tmp_path: Path) -> None:
    extra = _write(tmp_path / "extra.yaml", "task: {train_dl: {batchsize: 3}}\n")
    with pytest.raises(ConfigError, match=r"task\.train_dl\.batchsize"):
        compose_config([base, extra])


def test_missing_section(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "model: {name: digits_mlp}\ntask: {name: digits}\n")
    with pytest.raises(ConfigError, match="missing section 'optimizer'"):
        compose_config([path])


def test_bad_yaml_names_file_and_line(base: str, tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.yaml", "model:\n  hidden: 3\ntask: {name: digits\noptimizer: {name: adam}\n")
    with pytest.raises(ConfigError) as info:
        compose_config([base, bad])
    assert f"bad YAML in {bad}:4" in str(info.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = _write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        compose_config([path])


def test_empty_file_is_an_empty_layer(base: str, tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.yaml", "")
    assert compose_config([base, empty]).model.hidden == 32


def test_missing_config_file_lists_the_packaged_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml .*packaged config: .*digits"):
        compose_config([str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="give at least one config file"):
        compose_config([])


def test_missing_required_value_is_named(base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "ml_compose_test_required"
    _write(
        tmp_path / f"{module}.py",
        """\
        from dataclasses import dataclass

        from ml.core.config import MISSING, conf_field
        from ml.examples.digits import DigitsMLP, DigitsMLPConfig


        @dataclass
        class NeedsConfig(DigitsMLPConfig):
            vocab_size: int = conf_field(MISSING, help="Required")


        class Needs(DigitsMLP):
            def __init__(self, config: NeedsConfig) -> None:
                super().__init__(config)
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ConfigError, match=r"missing required value model\.vocab_size"):
        compose_config([base], [f"model.name={module}:Needs"])
    root = compose_config([base], [f"model.name={module}:Needs", "model.vocab_size=5"])
    assert root.model.vocab_size == 5


def test_set_default_exp_name(base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Set (empty, which counts as unset) rather than deleted, so that the value the function
    # writes is undone after the test.
    monkeypatch.setenv(EXP_NAME_ENV, "")
    set_default_exp_name([base])
    assert os.environ[EXP_NAME_ENV] == "base"  # a file is named after its stem
    monkeypatch.setenv(EXP_NAME_ENV, "")
    set_default_exp_name(["digits"])
    assert os.environ[EXP_NAME_ENV] == "digits"  # a config.yaml is named after its folder
    set_default_exp_name([base])
    assert os.environ[EXP_NAME_ENV] == "digits"  # an explicit name is never replaced


def test_build_objects_and_component_errors(base: str) -> None:
    root = compose_config([base], ["model.hidden=4"])
    objects = build_objects(root)
    assert objects.model.config.hidden == 4
    assert objects.task.config.max_steps == 100
    assert [type(lg).__name__ for lg in objects.loggers] == ["StdoutLogger"]
    with pytest.raises(ConfigError, match=r"task \(digits\): task.max_steps must be positive"):
        build_objects(compose_config([base], ["task.max_steps=-1"]))


def test_the_same_config_builds_the_same_initial_weights(base: str) -> None:
    import torch

    first = build_objects(compose_config([base], []))
    torch.rand(5)  # whatever ran in between
    second = build_objects(compose_config([base], []))
    third = build_objects(compose_config([base], ["task.seed=7"]))
    for (name, a), b, c in zip(
        first.model.state_dict().items(),
        second.model.state_dict().values(),
        third.model.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        assert name.endswith("bias") or not torch.equal(a, c), name


def test_config_fields_lists_nested_fields_with_help() -> None:
    from ml.trainers.sl import SupervisedLearningTrainerConfig

    rows = {
        name: (type_name, default, help_text)
        for name, type_name, default, help_text in config_fields(SupervisedLearningTrainerConfig)
    }
    assert rows["checkpoint.save_every_n_steps"] == ("int | None", "None", "Save a checkpoint every N steps")
    assert "checkpoint" not in rows  # a nested block is listed by its fields
    assert rows["name"][2] == "Registered name, or `package.module:ClassName`"
    assert all(help_text for _, _, help_text in rows.values())


def test_a_file_with_a_mapping_for_the_logger_list_is_shown_the_yaml_to_write(
    base: str, tmp_path: Path
) -> None:
    extra = _write(tmp_path / "extra.yaml", "logger: {name: jsonl, write_every_n_steps: 2}\n")
    with pytest.raises(ConfigError) as info:
        compose_config([base, extra])
    assert str(info.value) == (
        f"{extra}: logger is a list of loggers (stdout), not a mapping: "
        "write logger: [{name: jsonl, write_every_n_steps: 2}]"
    )


def test_a_multirun_sweep_override_is_refused_with_all_its_choices(base: str) -> None:
    """``-m sweep.optimizer.lr=1e-3,2e-3`` is refused whole, not once per point of its split."""
    from ml.launchers.sweep import expand

    with pytest.raises(ConfigError) as info:
        expand([base, "sweep.optimizer.lr=1e-3,2e-3"], multirun=True)
    assert str(info.value).startswith("sweep.optimizer.lr=1e-3,2e-3: a sweep is not")
    assert "-m optimizer.lr=1e-3,2e-3," in str(info.value)


def test_the_logger_outputs_compose_knows_are_the_loggers_own() -> None:
    from ml.core.compose import _LOGGER_OUTPUTS
    from ml.loggers.jsonl import METRICS_FILE_NAME
    from ml.loggers.mlflow import MLFLOW_DIR_NAME
    from ml.loggers.stdout import LOG_FILE_NAME
    from ml.loggers.tensorboard import TENSORBOARD_DIR_NAME
    from ml.loggers.wandb import WANDB_DIR_NAME

    written_by_the_loggers = {
        "stdout": LOG_FILE_NAME,
        "jsonl": METRICS_FILE_NAME,
        "tensorboard": f"{TENSORBOARD_DIR_NAME}/",
        "wandb": f"{WANDB_DIR_NAME}/",
        "mlflow": f"{MLFLOW_DIR_NAME}/",
    }
    assert written_by_the_loggers == _LOGGER_OUTPUTS


@pytest.mark.parametrize(
    ("loggers", "message"),
    [
        (
            "[{name: stdout}, {name: jsonl}, {name: ml.loggers.stdout:StdoutLogger, precision: 2}]",
            "logger[0] and logger[2] are both stdout loggers, which write the log folder's one stdout.log",
        ),
        (
            "[{name: tensorboard}, {name: tensorboard}]",
            "tensorboard loggers, which write the log folder's one tensorboard/",
        ),
        (
            "[{name: wandb}, {name: wandb, project: other}]",
            "wandb loggers, which write the log folder's one wandb/",
        ),
        (  # the second names the experiment the first takes from trainer.exp_name
            "[{name: mlflow}, {name: mlflow, experiment_name: '${trainer.exp_name}'}]",
            "mlflow loggers, which write the run into one MLflow experiment (",
        ),
        (
            "[{name: mlflow, tracking_uri: 'http://127.0.0.1:1'}, {name: mlflow, tracking_uri: 'http://127.0.0.1:1'}]",
            "in http://127.0.0.1:1)",
        ),
    ],
)
def test_two_loggers_of_one_output_are_refused(base: str, loggers: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_config([base], [f"logger={loggers}"])
    assert message in str(info.value)
    assert "keep one of them in the logger list" in str(info.value)


def test_loggers_of_different_outputs_are_kept(base: str) -> None:
    server = "tracking_uri: 'http://127.0.0.1:1'"
    loggers = (
        "[{name: stdout}, {name: jsonl}, {name: tensorboard}, {name: wandb}, {name: mlflow}, "
        "{name: mlflow, experiment_name: other}, "  # the run folder's store, another experiment
        f"{{name: mlflow, {server}}}, {{name: mlflow, {server}, experiment_name: other}}]"
    )
    root = compose_config([base], [f"logger={loggers}"])
    assert [node.name for node in root.logger] == ["stdout", "jsonl", "tensorboard", "wandb", *["mlflow"] * 4]
