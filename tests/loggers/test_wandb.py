"""Tests for :mod:`ml.loggers.wandb`: the real ``wandb`` package offline, its run files read back
with wandb's own reader (``wandb leet inspect``), and how the mode is chosen."""

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ml.core.compose import build_component
from ml.core.state import State
from ml.errors import ConfigError
from ml.loggers.base import LogBatch
from ml.loggers.wandb import WandbLogger, WandbLoggerConfig, default_project, wandb_mode

wandb = pytest.importorskip("wandb")

WANDB = str(Path(sys.executable).parent / "wandb")
CONFIG = OmegaConf.create(
    {"optimizer": {"name": "adamw", "lr": 0.001}, "trainer": {"name": "sl", "exp_name": "digits"}}
)


def _records(*run_files: Path) -> list[list[dict[str, Any]]]:
    """The records of each .wandb file, read by wandb's own reader (``wandb leet inspect --json``),
    one reader per file, side by side."""
    readers = [
        subprocess.Popen(
            [WANDB, "leet", "inspect", "--json", str(run_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        for run_file in run_files
    ]
    outputs = []
    try:
        for reader in readers:
            out, err = reader.communicate(timeout=60)
            assert reader.returncode == 0, err
            outputs.append([json.loads(line) for line in out.splitlines() if line.strip()])
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.communicate()
    return outputs


def test_the_mode_comes_from_the_config_then_wandb_mode_then_the_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(None) == "offline"  # no key: nothing is lost to a missing login
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"
    assert wandb_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE must be one of online, offline, disabled"):
        wandb_mode(None)
    node = OmegaConf.structured(WandbLoggerConfig(name="wandb", mode="cloud"))
    with pytest.raises(ConfigError, match=r"logger\[0\] \(wandb\): mode must be one of"):
        build_component("logger[0]", "logger", node)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"project": "team/vision"}, "project 'team/vision' contains /: W&B names cannot contain"),
        ({"project": "p" * 129}, "project is 129 characters long: W&B takes at most 128"),
        ({"entity": "a#b:c"}, "entity 'a#b:c' contains # :"),
        ({"tags": ["ok", "t" * 65]}, "tags[1] is 65 characters long: W&B takes at most 64"),
        ({"tags": [""]}, "tags[0] is empty"),
    ],
)
def test_names_wandb_refuses_are_refused_when_the_logger_is_built(
    settings: dict[str, Any], expected: str
) -> None:
    node = OmegaConf.structured(WandbLoggerConfig(name="wandb", **settings))
    with pytest.raises(ConfigError, match=rf"logger\[0\] \(wandb\): {re.escape(expected)}"):
        build_component("logger[0]", "logger", node)
    # wandb itself refuses them too (in wandb.init, once the run folder exists), except the entity,
    # which it leaves to the server, in the run's path <entity>/<project>.
    if "entity" not in settings:
        with pytest.raises((wandb.errors.UsageError, ValueError)):
            wandb.Settings(project=settings.get("project"), run_tags=settings.get("tags"))
    limits = WandbLoggerConfig(name="wandb", project="p" * 128, entity="my-team_1", tags=["t" * 64])
    assert WandbLogger(limits).config.project == "p" * 128


def test_the_default_project_takes_the_experiments_name_without_what_wandb_refuses() -> None:
    assert default_project("digits") == "digits"
    assert default_project("a:b/c#d") == "a-b-c-d"  # exp_name a:b is a fine folder name
    assert len(default_project("x" * 300)) == 128
    wandb.Settings(project=default_project("a/b\\c#d?e%f:g" + "x" * 300))  # what wandb.init takes


def test_an_offline_run_is_recorded_in_the_run_folder_and_continued_under_its_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    logs = tmp_path / "run_0" / "logs"
    first = WandbLogger(WandbLoggerConfig(name="wandb", tags=["cnn"]))
    first.initialize(logs)
    logs.parent.mkdir()
    (logs.parent / "config.yaml").write_text("task:\n  data_token: ${ml.secret:DATA_TOKEN}\n")  # as saved
    first.log_config(OmegaConf.merge(CONFIG, {"task": {"data_token": "s3cr3t-value"}}))  # as resolved
    state = State()
    for step in (1, 2):
        state.num_steps = step
        first.write(state, LogBatch(scalars={"train/loss": 1.0 / step}))
    state.set_phase("valid")
    image = torch.arange(24, dtype=torch.uint8).view(3, 2, 4)
    first.write(
        state,
        LogBatch(
            scalars={"valid/loss": 0.7},
            strings={"task/note": "hi"},
            histograms={"valid/logits": torch.tensor([0.0, 1.0, float("nan")])},
            images={"valid/grid": image},
        ),
    )
    saved = first.state_dict()  # what the checkpoint keeps
    first.on_session_end("interrupted")
    first.close()

    second = WandbLogger(WandbLoggerConfig(name="wandb"))
    second.initialize(logs)
    second.load_state_dict(saved)
    second.log_config(CONFIG)
    state.set_phase("train")
    state.num_steps = 3
    second.write(state, LogBatch(scalars={"train/loss": 0.25}))
    second.on_session_end("finished")
    second.close()

    run_files = sorted((logs / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in run_files] == [f"run-{saved['run_id']}.wandb"] * 2  # one id, a folder per session
    records, second_records = _records(*run_files)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "digits" and run["display_name"] == "digits/run_0" and run["tags"] == ["cnn"]
    assert run["config"]["update"]["optimizer"] == {"name": "adamw", "lr": 0.001}
    assert run["config"]["update"]["task"] == {"data_token": "${ml.secret:DATA_TOKEN}"}
    assert not any(b"s3cr3t" in path.read_bytes() for path in logs.rglob("*") if path.is_file())
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [1, 2]
    assert (history[1]["train/loss"], history[2]["train/loss"]) == (1.0, 0.5)
    assert (history[2]["valid/loss"], history[2]["task/note"]) == (0.7, "hi")
    item = history[2]  # wandb's reader flattens media: "<name>.<field>"
    assert item["valid/logits._type"] == "histogram"
    assert (item["valid/grid._type"], item["valid/grid.width"], item["valid/grid.height"]) == (
        "image-file",
        4,
        2,
    )
    png = run_files[0].parent / "files" / item["valid/grid.path"]
    assert torch.equal(torch.from_numpy(np.array(Image.open(png))).permute(2, 0, 1), image)
    later = {
        r["history"]["step"]["num"]: r["history"]["item"] for r in second_records if r["type"] == "history"
    }
    assert later == {3: pytest.approx({**later[3], "train/loss": 0.25})}
    exits = [
        [r["exit"].get("exit_code", 0) for r in rs if r["type"] == "exit"] for rs in (records, second_records)
    ]
    assert exits == [[1], [0]]  # preempted (marked so), then finished
    assert any(r["type"] == "preempting" for r in records)


_SESSION = """\
import sys
from pathlib import Path
from omegaconf import OmegaConf
from ml.core.state import State
from ml.loggers.base import LogBatch
from ml.loggers.wandb import WandbLogger, WandbLoggerConfig
logger = WandbLogger(WandbLoggerConfig(name="wandb"))
logger.initialize(Path(sys.argv[1]))
logger.log_config(OmegaConf.create({"trainer": {"name": "sl", "exp_name": "digits"}}))
state = State()
state.num_steps = 1
logger.write(state, LogBatch(scalars={"train/loss": 1.0}))
logger.close()
"""


def test_wandbs_debug_logs_and_caches_stay_in_the_run_folder(tmp_path: Path) -> None:
    """wandb-core's core-debug/symon-debug logs and wandb's caches land under <logs>/wandb, not in
    the home folder, the XDG folders or the working directory."""
    import os

    outside = {name: tmp_path / name for name in ("home", "cache", "data", "config", "cwd")}
    for folder in outside.values():
        folder.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}
    env.update(
        HOME=str(outside["home"]),
        XDG_CACHE_HOME=str(outside["cache"]),
        XDG_DATA_HOME=str(outside["data"]),
        XDG_CONFIG_HOME=str(outside["config"]),
    )
    logs = tmp_path / "run_0" / "logs"
    result = subprocess.run(
        [sys.executable, "-c", _SESSION, str(logs)],
        env=env,
        cwd=outside["cwd"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = {name: sorted(p for p in folder.rglob("*") if p.is_file()) for name, folder in outside.items()}
    assert written == {name: [] for name in outside}
    assert list((logs / "wandb").rglob("core-debug-*.log"))  # wandb-core's log: in the run folder
    assert list((logs / "wandb").glob("offline-run-*/run-*.wandb"))
